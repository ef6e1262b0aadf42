"""Create (or refresh) the demo: a staff user, a demo tenant with its owner, an API key, and the dev pool."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction

from billing.models import Price
from finetune import deploy
from serving.models import AdapterDeployment, Backend, BackendPool, BaseModel, ModelConfig
from serving.tinymodel import read_model_id
from tenants import services
from tenants.models import ApiKey, Tenant

DEMO_PASSWORD = "demo-password-2026"


class Command(BaseCommand):
    help = "Create the demo tenant, users, an API key and the dev backend pool; print how to use them."

    def add_arguments(self, parser):
        parser.add_argument("--model-path", required=True, help="Folder of the tiny model (python -m serving.tinymodel PATH).")
        parser.add_argument("--backend-url", default="http://127.0.0.1:8081")
        parser.add_argument("--console-url", default="http://127.0.0.1:8000")
        parser.add_argument("--json", action="store_true", help="Print the demo credentials as JSON.")

    def handle(self, *args, model_path, backend_url, console_url, json: bool, **options):
        with transaction.atomic():
            backend, secret = self._setup(model_path, backend_url)
        self._reload_adapters(backend, out=self.stderr if json else self.stdout)  # --json: stdout is the JSON only
        self._print(console_url, secret, json)

    def _reload_adapters(self, backend: Backend, out) -> None:
        """The dev backend was just (re)started: adapters deployed before are loaded again, or they would silently
        answer as the base model. Waits for it to come up (the tiny model loads in seconds)."""
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

    def _setup(self, model_path, backend_url) -> tuple[Backend, str]:
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

        config = _model_config(Path(model_path))
        hf_id = read_model_id(Path(model_path)) or "platform/tiny-chat"
        base, _ = BaseModel.objects.update_or_create(
            name="tiny-chat",
            # The tiny model learns only at a high rate (LoRA cannot touch its embeddings): 50 examples, ~20 steps.
            defaults={"hf_id": hf_id, "local_path": str(Path(model_path).resolve()), "finetune_learning_rate": 1e-2, **_shape(config)},
        )
        # Demo prices, in cents per million tokens (staff edit them in the admin).
        Price.objects.get_or_create(
            base_model=base, adapter=None, pool=None, effective_from=date(2026, 1, 1),
            defaults={"input_price": 50, "output_price": 150, "training_price": 300},
        )
        pool, _ = BackendPool.objects.update_or_create(
            name="dev-tiny", defaults={"base_model": base, "kind": BackendPool.Kind.DEV, "gpu_memory_gb": 80, "gpu_hourly_cost_cents": 400}
        )
        backend, _ = Backend.objects.update_or_create(pool=pool, url=backend_url, defaults={"max_concurrency": 8, "enabled": True})
        ModelConfig.objects.for_tenant(tenant).get_or_create(defaults={"default_model": "tiny-chat"})
        if not tenant.active_prompt_id:
            services.system_prompt_save(tenant=tenant, text="You are the helpful assistant of Demo Inc.", note="demo", actor=services.Actor(user=owner))

        # A fresh demo key on every run: secrets are shown once and never stored.
        for old in ApiKey.objects.for_tenant(tenant).filter(name="demo", revoked_at__isnull=True):
            services.api_key_revoke(key=old, actor=services.SYSTEM)
        _, secret = services.api_key_create(
            tenant=tenant, name="demo", scopes=[s.value for s in ApiKey.Scope], actor=services.Actor(user=owner)
        )
        return backend, secret

    def _print(self, console_url: str, secret: str, json: bool) -> None:
        info = {
            "console": f"{console_url}/",
            "login": "demo@example.com",
            "staff_login": "admin@example.com",
            "password": DEMO_PASSWORD,
            "api_key": secret,
            "base_url": f"{console_url}/v1",
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
                    "      -H 'Content-Type: application/json' -d '{\"model\": \"tiny-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}]}'",
                    "",
                ]
            )
        )


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
