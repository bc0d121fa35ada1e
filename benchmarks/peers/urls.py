from __future__ import annotations

from django.conf import settings
from django.urls import path

urlpatterns = [path("items/", settings.VARIANT.view())]  # type: ignore[misc]
