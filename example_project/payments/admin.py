from django.contrib import admin

from payments.models import Account, Transfer

admin.site.register(Account)
admin.site.register(Transfer)
