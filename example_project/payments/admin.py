from django.contrib import admin

from payments.models import Account, Receipt, Transfer

admin.site.register(Account)
admin.site.register(Transfer)
admin.site.register(Receipt)
