from django.apps import AppConfig


class ServingConfig(AppConfig):
    name = "serving"

    def ready(self) -> None:
        from serving import checks, signals  # noqa: F401 - checks registers the deployment checks

        signals.connect()
