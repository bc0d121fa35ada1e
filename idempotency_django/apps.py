from __future__ import annotations

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class IdempotencyConfig(AppConfig):
    name = "idempotency_django"
    verbose_name = _("Idempotency keys")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core import checks

        from idempotency_django.checks import check_settings

        checks.register(check_settings)
        # With the Celery extra installed, tasks published inside an operation carry a key
        # derived from it (idempotency_django.tasks connects the publish hook).
        import idempotency_django.tasks  # noqa: F401
