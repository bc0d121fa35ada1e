from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from django.views.decorators.csrf import csrf_exempt
from rest_framework.routers import DefaultRouter

from idempotency_django.views import metrics
from tests.testapp import views

router = DefaultRouter()
router.register("payments", views.PaymentViewSet)

urlpatterns = [
    path("admin/", admin.site.urls),
    path("metrics", metrics),
    path("", include(router.urls)),
    path("baseline/", views.AtomicBaselineView.as_view()),
    path("generic/", views.GenericCreateView.as_view()),
    path("swallow/", views.SwallowsDatabaseErrorView.as_view()),
    path("upload/", views.UploadView.as_view()),
    path("required/", views.RequiredKeyView.as_view()),
    path("authenticated/", views.AuthenticatedView.as_view()),
    path("throttled/", views.ThrottledView.as_view()),
    path("lost-connection/", views.LostConnectionView.as_view()),
    path("wait/", views.WaitView.as_view()),
    path("forever/", views.ForeverView.as_view()),
    path("function/", views.function_payment),
    path("plain/", csrf_exempt(views.plain_payment)),
    path("short-ttl/", views.ShortTTLView.as_view()),
]

urlpatterns += [
    path("plain-raises/", csrf_exempt(views.plain_raises)),
    path("plain-deep/", csrf_exempt(views.plain_deep_body)),
    path("deep/", views.DeepBodyView.as_view()),
    path("principal/", views.PrincipalView.as_view()),
    path("charge-downstream/", views.ChargeDownstreamView.as_view()),
]
