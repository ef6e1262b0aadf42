from django.apps import AppConfig


class FinetuneConfig(AppConfig):
    name = "finetune"
