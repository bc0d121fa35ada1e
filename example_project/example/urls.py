from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from payments import views
from rest_framework.routers import DefaultRouter

from idempotency_django.views import metrics

router = DefaultRouter()
router.register("accounts", views.AccountViewSet)
router.register("transfers", views.TransferViewSet)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics),
    path("api/", include(router.urls)),
    path("api/deposit/", views.deposit),
    path("api/withdraw/", views.withdraw),
    path("api/webhooks/transfer-settled/", views.transfer_settled_webhook),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema")),
]
