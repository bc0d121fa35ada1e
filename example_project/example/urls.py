from django.contrib import admin
from django.urls import include, path
from payments import views
from rest_framework.routers import DefaultRouter

router = DefaultRouter()
router.register("accounts", views.AccountViewSet)
router.register("transfers", views.TransferViewSet)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include(router.urls)),
    path("api/deposit/", views.deposit),
    path("api/withdraw/", views.withdraw),
]
