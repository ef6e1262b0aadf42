"""Create (or refresh) the demo: a staff user, a demo tenant with its owner, an API key, and the dev pool serving the
demo's chat model (SmolLM2-135M-Instruct, built by `python -m devbackend.demomodel PATH`)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from billing.models import Price
from finetune import deploy
from serving.models import AdapterDeployment, Backend, BackendPool, BaseModel, ModelConfig
from devbackend.demomodel import DEFAULT_MODEL_ID
from devbackend.tinymodel import read_model_id
from tenants import services
from tenants.models import ApiKey, Tenant

DEMO_PASSWORD = "demo-password-2026"
DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEMO_CONTEXT_LENGTH = 2048  # of SmolLM2's 8,192: the CPU answers long prompts slowly; up.sh starts the backend with it
# LoRA's usual rate; "auto" raises it for short jobs (finetune.services), which is what teaches a few dozen examples.
DEMO_FINETUNE_LEARNING_RATE = 2e-4


class Command(BaseCommand):
    help = "Create the demo tenant, users, an API key and the dev backend pool; print how to use them."

    def add_arguments(self, parser):
        parser.add_argument("--model-path", required=True, help="Folder of the model the dev backend serves "
                            "(python -m devbackend.demomodel PATH).")
        parser.add_argument("--model-name", default=DEMO_MODEL_NAME, help="Its public name (the API's `model`).")
        parser.add_argument("--context-length", type=int, default=DEMO_CONTEXT_LENGTH,
                            help="Tokens of prompt + answer: the dev backend's --max-total-tokens.")
        parser.add_argument("--finetune-learning-rate", type=float, default=DEMO_FINETUNE_LEARNING_RATE,
                            help="LoRA learning rate at learning_rate_multiplier 1.")
        parser.add_argument("--backend-url", default="http://127.0.0.1:8081")
        parser.add_argument("--console-url", default="http://127.0.0.1:8000")
        parser.add_argument("--json", action="store_true", help="Print the demo credentials as JSON.")

    def handle(self, *args, model_path, backend_url, console_url, json: bool, model_name, context_length,
               finetune_learning_rate, **options):
        if settings.PRODUCTION or settings.SECRET_KEY != settings.DEVELOPMENT_SECRET_KEY:
            # It creates a superuser whose password is printed in the README: never on a real deployment.
            raise CommandError("demo_setup creates accounts with published passwords (a superuser among them) and is for the "
                               "embedded development setup only; this one runs with PLATFORM_ENV=production or its own "
                               "DJANGO_SECRET_KEY. Create staff with `manage.py createsuperuser` instead.")
        model = DemoModel(Path(model_path), model_name, context_length, finetune_learning_rate)
        with transaction.atomic():
            backend, secret = self._setup(model, backend_url)
        self._reload_adapters(backend, out=self.stderr if json else self.stdout)  # --json: stdout is the JSON only
        self._print(console_url, secret, json, model_name)

    def _reload_adapters(self, backend: Backend, out) -> None:
        """The dev backend was just (re)started: adapters deployed before are loaded again, or they would silently
        answer as the base model. Waits for it to come up (the demo model loads in seconds)."""
        if not AdapterDeployment.all_tenants.filter(pool=backend.pool).exists():
            return
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(backend.url.rstrip("/") + "/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stderr.write(f"The dev backend at {backend.url} did not answer; deployed adapters were not reloaded.")
                    return
                time.sleep(0.5)
        names = deploy.backend_reload_adapters(backend)
        out.write(f"  Reloaded {len(names)} deployed adapter(s) on the dev backend.")

    def _setup(self, model: "DemoModel", backend_url) -> tuple[Backend, str]:
        User = get_user_model()
        staff, created = User.objects.get_or_create(username="admin@example.com", defaults={"email": "admin@example.com", "is_staff": True, "is_superuser": True})
        if created:
            staff.set_password(DEMO_PASSWORD)
            staff.save()
        owner, created = User.objects.get_or_create(username="demo@example.com", defaults={"email": "demo@example.com"})
        if created:
            owner.set_password(DEMO_PASSWORD)
            owner.save()
        tenant = Tenant.objects.filter(slug="demo").first() or services.tenant_create(slug="demo", name="Demo Inc.", owner=owner)

        config = _model_config(model.path)
        hf_id = read_model_id(model.path) or DEFAULT_MODEL_ID
        base, _ = BaseModel.objects.update_or_create(
            name=model.name,
            defaults={"hf_id": hf_id, "local_path": str(model.path.resolve()),
                      "finetune_learning_rate": model.finetune_learning_rate,
                      **_shape(config), "context_length": model.context_length},
        )
        # Demo prices, in cents per million tokens (staff edit them in the admin).
        Price.objects.get_or_create(
            base_model=base, adapter=None, pool=None, effective_from=date(2026, 1, 1),
            defaults={"input_price": 50, "output_price": 150, "training_price": 300},
        )
        # The dev backend loads adapters of any rank; 16 is what a default vLLM pool (--max-lora-rank) serves.
        pool, _ = BackendPool.objects.update_or_create(
            name=f"dev-{model.name}", defaults={"base_model": base, "kind": BackendPool.Kind.DEV, "gpu_memory_gb": 80,
                                                "gpu_hourly_cost_cents": 400, "max_lora_rank": 16}
        )
        backend, _ = Backend.objects.update_or_create(pool=pool, url=backend_url, defaults={"max_concurrency": 8, "enabled": True})
        # A demo set up before on another model (the tiny one): the server at this address now serves this model, so
        # the old pool's backend there must not take the old model's requests.
        for stale in Backend.objects.filter(url=backend_url, enabled=True).exclude(pool=pool):
            stale.enabled = False
            stale.save(update_fields=["enabled"])  # save(): the gateway's signals fire
        model_config, _ = ModelConfig.objects.for_tenant(tenant).get_or_create(defaults={"default_model": model.name})
        if model_config.default_model in ("", "tiny-chat") and model_config.default_model != model.name:
            model_config.default_model = model.name
            model_config.save(update_fields=["default_model"])
        if not tenant.active_prompt_id:
            services.system_prompt_save(tenant=tenant, text="You are the helpful assistant of Demo Inc.", note="demo", actor=services.Actor(user=owner))

        # A fresh demo key on every run: secrets are shown once and never stored.
        for old in ApiKey.objects.for_tenant(tenant).filter(name="demo", revoked_at__isnull=True):
            services.api_key_revoke(key=old, actor=services.SYSTEM)
        _, secret = services.api_key_create(
            tenant=tenant, name="demo", scopes=[s.value for s in ApiKey.Scope], actor=services.Actor(user=owner)
        )
        return backend, secret

    def _print(self, console_url: str, secret: str, json: bool, model_name: str) -> None:
        info = {
            "console": f"{console_url}/",
            "login": "demo@example.com",
            "staff_login": "admin@example.com",
            "password": DEMO_PASSWORD,
            "api_key": secret,
            "base_url": f"{console_url}/v1",
            "model": model_name,
        }
        if json:
            self.stdout.write(__import__("json").dumps(info))
            return
        self.stdout.write(
            "\n".join(
                [
                    "",
                    f"  Console:      {info['console']}",
                    f"  Demo login:   {info['login']} / {DEMO_PASSWORD}",
                    f"  Staff admin:  {console_url}/admin/  ({info['staff_login']} / {DEMO_PASSWORD})",
                    f"  Demo API key: {secret}",
                    "",
                    "  Try it:",
                    f"    curl {console_url}/v1/chat/completions -H 'Authorization: Bearer {secret}' \\",
                    f"      -H 'Content-Type: application/json' -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'",
                    "",
                ]
            )
        )


@dataclass(frozen=True)
class DemoModel:
    path: Path
    name: str
    context_length: int
    finetune_learning_rate: float


def _model_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _shape(config: dict) -> dict:
    return {
        "context_length": config.get("max_position_embeddings", 1024),
        "hidden_size": config.get("hidden_size", 0),
        "num_layers": config.get("num_hidden_layers", 0),
        "num_attention_heads": config.get("num_attention_heads", 0),
        "num_key_value_heads": config.get("num_key_value_heads", config.get("num_attention_heads", 0)),
        "intermediate_size": config.get("intermediate_size", 0),
    }
