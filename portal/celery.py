"""The Celery application. Every role runs the same Django project; the command line picks the queue."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
# Every process (web, workers, the trainer) reads models and adapters from local folders: offline for the Hugging Face
# libraries, or peft looks an adapter's base model up on the Hub when saving it and transformers may download. Set here,
# before anything imports huggingface_hub (it reads them once). Not when trained adapters are pushed to the Hub
# (PLATFORM_HF_HUB_TOKEN), which needs it; an explicit HF_HUB_OFFLINE=0 wins (docs/configuration.md).
if not os.environ.get("PLATFORM_HF_HUB_TOKEN"):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

app = Celery("portal")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
