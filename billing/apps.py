from django.apps import AppConfig


class BillingConfig(AppConfig):
    name = "billing"

    def ready(self):
        from billing import alert_tasks  # noqa: F401  registers the alerts' Celery tasks (autodiscovery reads billing.tasks only)
