# The Celery app is loaded with Django, so that @shared_task tasks use its configuration.
from example.celery import app as celery_app

__all__ = ["celery_app"]
