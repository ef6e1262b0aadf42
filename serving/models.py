"""What the gateway routes to (base models, pools, backends, adapters), tenants' model settings, and the usage ledger."""

from __future__ import annotations

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from tenants.models import ApiKey, Tenant
from tenants.scoping import TenantOwnedModel, UnscopedQueryError


class BaseModel(models.Model):
    """A base model the platform serves, by its public name (what tenants put in `model`)."""

    name = models.CharField(max_length=100, unique=True, help_text="Public model id, e.g. 'tiny-chat'.")
    hf_id = models.CharField(max_length=200, help_text="Hugging Face id (or local id) the backends serve; adapters record it as base_model_name_or_path.")
    local_path = models.CharField(max_length=500, blank=True, help_text="Local folder with the weights and tokenizer (dev backend, trainer, token counting).")
    context_length = models.PositiveIntegerField(default=4096)
    # Architecture, for the LoRA memory planner (exact per-module counts).
    hidden_size = models.PositiveIntegerField(default=0)
    num_layers = models.PositiveIntegerField(default=0)
    num_attention_heads = models.PositiveIntegerField(default=0)
    num_key_value_heads = models.PositiveIntegerField(default=0)
    intermediate_size = models.PositiveIntegerField(default=0)
    available_to_all = models.BooleanField(default=True, help_text="Every tenant may use it (subject to its allowed models).")
    finetune_learning_rate = models.FloatField(
        default=2e-4, help_text="LoRA learning rate at learning_rate_multiplier 1 (≈ 1e-4–2e-4 for large models; tiny models need more)."
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class PoolQuerySet(models.QuerySet):
    def reachable_by(self, tenant):
        """The pools a tenant's traffic may use: the shared ones and those dedicated to it. THE scoped query for
        pools (another tenant's dedicated pool is never in it); routing picks among them (serving.routing)."""
        return self.filter(models.Q(dedicated_tenant__isnull=True) | models.Q(dedicated_tenant=tenant))

    def dedicated_to(self, tenant):
        """The pools dedicated to a tenant (isolated tenancy): its own, never another's and never a shared one. THE
        scoped query for them; app code does not filter on dedicated_tenant by hand (tests/tenants/test_fail_closed).
        No tenant is an error, not the shared pools (which `dedicated_tenant=None` would be)."""
        if tenant is None or getattr(tenant, "pk", tenant) is None:
            raise UnscopedQueryError("BackendPool.objects.dedicated_to() was given no tenant.")
        return self.filter(dedicated_tenant=tenant)


class BackendPool(models.Model):
    class Kind(models.TextChoices):
        TGI = "tgi", "TGI"
        VLLM = "vllm", "vLLM"
        DEV = "dev", "Dev backend"

    name = models.CharField(max_length=100, unique=True)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="pools")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    dedicated_tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="+", help_text="Isolated tenancy: only this tenant is ever routed here."
    )
    capacity = models.PositiveIntegerField(default=0, help_text="Concurrent requests the scheduler lets through; 0 = sum of backends' max concurrency.")
    gpu_memory_gb = models.PositiveIntegerField(default=0, help_text="GPU memory per backend, for the LoRA capacity planner.")
    gpu_hourly_cost_cents = models.PositiveIntegerField(default=0, help_text="Cost of one backend per hour, in cents.")
    lora_adapters_env = models.TextField(blank=True, help_text="TGI pools: the LORA_ADAPTERS value backends must start with.")
    max_lora_rank = models.PositiveIntegerField(
        default=16, validators=[MinValueValidator(1)],
        help_text="Highest LoRA rank its backends load: vLLM's --max-lora-rank (16 by default), TGI's MAX_LORA_RANK. "
                  "Fine-tuning refuses a rank no pool of the base model serves.",
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = PoolQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Backend(models.Model):
    pool = models.ForeignKey(BackendPool, on_delete=models.CASCADE, related_name="backends")
    url = models.URLField(max_length=300)
    max_concurrency = models.PositiveIntegerField(default=16, validators=[MinValueValidator(1)])
    enabled = models.BooleanField(default=True)
    healthy = models.BooleanField(default=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=300, blank=True)
    loaded_adapters = models.JSONField(default=list, blank=True, help_text="Adapter names this backend is known to serve.")
    needs_restart = models.BooleanField(default=False, help_text="TGI: LORA_ADAPTERS changed; restart to load them.")

    class Meta:
        ordering = ["pool", "id"]
        constraints = [models.UniqueConstraint(fields=["pool", "url"], name="unique_backend_url_per_pool")]

    def __str__(self) -> str:
        return self.url


class Adapter(TenantOwnedModel):
    """A tenant's LoRA adapter. `name` is what the tenant sends as `model` (ft:{base}:{tenant}:{suffix}:{id})."""

    class Source(models.TextChoices):
        TRAINED = "trained", "Trained here"
        UPLOADED = "uploaded", "Uploaded"  # the tenant's own PEFT LoRA, checked by finetune.byo

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=200, unique=True)
    base_model = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="+")
    path = models.CharField(max_length=500, help_text="Folder with adapter_config.json and adapter_model.safetensors.")
    rank = models.PositiveIntegerField(default=8)
    alpha = models.PositiveIntegerField(default=16)
    target_modules = models.JSONField(default=list)
    parameters = models.PositiveBigIntegerField(default=0)
    size_bytes = models.PositiveBigIntegerField(default=0)
    hub_repo = models.CharField(max_length=200, blank=True, help_text="Private Hugging Face Hub copy: repo id and folder, once pushed.")
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.TRAINED)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class AdapterDeployment(TenantOwnedModel):
    """An adapter published to a pool. Routed to only on backends whose `loaded_adapters` list it."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending (loading or awaiting restart)"
        ACTIVE = "active", "Active"
        FAILED = "failed", "Failed"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="deployments")
    pool = models.ForeignKey(BackendPool, on_delete=models.CASCADE, related_name="deployments")
    state = models.CharField(max_length=8, choices=State.choices, default=State.PENDING)
    error = models.CharField(max_length=300, blank=True, help_text="Why it is not (fully) loaded, in the platform's words: shown to the tenant.")
    error_detail = models.TextField(blank=True, help_text="The backends' own answers to the last failed loads (staff only: backend addresses and wording).")
    failed_on = models.JSONField(
        default=list, blank=True,
        help_text="Ids of the backends that refused to load it. Not retried there until a change: the backend disabled and "
                  "enabled again, the tenant deploying again, or staff's 'Retry deployment'.",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        constraints = [models.UniqueConstraint(fields=["adapter", "pool"], name="one_deployment_per_adapter_and_pool")]


class MergedModel(TenantOwnedModel):
    """An isolated tenant's adapter merged into its base weights (finetune.merge): a model folder its dedicated pool
    serves as the backends' model, at base-model speed. While `serving`, the adapter's name routes to `pool` with this
    folder as the backend's model (serving.routing.routes_for), and that pool answers nothing else."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        MERGING = "merging", "Merging"
        READY = "ready", "Ready (restart the pool's backends on it, then serve it)"
        SERVING = "serving", "Serving"
        FAILED = "failed", "Failed"

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    adapter = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="merged_models")
    pool = models.ForeignKey(BackendPool, on_delete=models.CASCADE, related_name="merged_models",
                             help_text="The tenant's dedicated pool for the adapter's base model.")
    state = models.CharField(max_length=8, choices=State.choices, default=State.QUEUED)
    path = models.CharField(max_length=500, blank=True, help_text="The merged model folder (safetensors, config, tokenizer), once written.")
    parameters = models.PositiveBigIntegerField(default=0)
    size_bytes = models.PositiveBigIntegerField(default=0, help_text="The folder on disk.")
    weights_bytes = models.PositiveBigIntegerField(default=0, help_text="Its .safetensors files.")
    dtype = models.CharField(max_length=16, blank=True)
    error = models.CharField(max_length=300, blank=True)
    # The lease while merging: which worker, and when it last said it is alive (finetune.merge). One silent for
    # finetune's LEASE_SECONDS died: the periodic sweep sends the merge again and the next worker takes it over.
    worker_id = models.CharField(max_length=64, blank=True)
    worker_heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    serving_since = models.DateTimeField(null=True, blank=True)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["adapter", "pool"], name="one_merge_per_adapter_and_pool"),
            models.UniqueConstraint(fields=["pool"], condition=models.Q(state="serving"), name="one_serving_merge_per_pool"),
        ]

    @property
    def served_name(self) -> str:
        """The backends' model id for it (vLLM's --served-model-name): the adapter's name, which tenants call."""
        return self.adapter.name

    def __str__(self) -> str:
        return f"{self.adapter.name} merged"


class AdapterRollout(TenantOwnedModel):
    """A model name a tenant calls (`name`: the first version's ft: name) and the adapter version that serves it
    (`current`), with optionally a new version (`canary`) taking `canary_percent` % of the name's requests.

    Routing: `serving.routing.routes_for`; the gateway's split: `serving.gateway.plan.pick_version`; start, promote and
    roll back: `finetune.rollout`. Both versions are the tenant's own adapters on the same base model.
    """

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="+")
    name = models.CharField(max_length=200, help_text="The model name requests send; the ledger's `model`.")
    current = models.ForeignKey(Adapter, on_delete=models.CASCADE, related_name="+")
    canary = models.ForeignKey(Adapter, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    canary_percent = models.PositiveSmallIntegerField(default=0, validators=[MinValueValidator(0), MaxValueValidator(100)])
    canary_started_at = models.DateTimeField(null=True, blank=True, help_text="Since when the canary has its share (the comparison's window).")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantOwnedModel.Meta):
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="one_rollout_per_model_name")]

    def __str__(self) -> str:
        return self.name


class ModelConfig(TenantOwnedModel):
    """A tenant's model settings, edited in the console."""

    class SystemMessageRule(models.TextChoices):
        KEEP_BOTH = "keep", "Keep the user's system message after ours"
        REPLACE = "replace", "Replace the user's system message with ours"

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="model_config")
    default_model = models.CharField(max_length=200, blank=True, help_text="Used when a request names no model or 'default'.")
    allowed_models = models.JSONField(default=list, blank=True, help_text="Base model names this tenant may use; empty = all available.")
    default_max_tokens = models.PositiveIntegerField(default=256, validators=[MinValueValidator(1)])
    max_max_tokens = models.PositiveIntegerField(default=4096, validators=[MinValueValidator(1)])
    default_temperature = models.DecimalField(max_digits=3, decimal_places=2, default=1, validators=[MinValueValidator(0), MaxValueValidator(2)])
    max_temperature = models.DecimalField(max_digits=3, decimal_places=2, default=2, validators=[MinValueValidator(0), MaxValueValidator(2)])
    system_message_rule = models.CharField(max_length=8, choices=SystemMessageRule.choices, default=SystemMessageRule.KEEP_BOTH)
    auto_deploy_finetuned = models.BooleanField(
        default=True, help_text="Deploy a fine-tuning job's model as soon as the job succeeds (as OpenAI does), so it is callable at once."
    )
    # Output guard.
    redact_emails = models.BooleanField(default=False)
    redact_phone_numbers = models.BooleanField(default=False)
    redact_card_numbers = models.BooleanField(default=False)
    redact_patterns = models.JSONField(default=list, blank=True, help_text="Custom regular expressions to redact.")
    blocked_terms = models.JSONField(default=list, blank=True, help_text="Terms replaced in the output.")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta(TenantOwnedModel.Meta):
        pass


class UsageRecord(TenantOwnedModel):
    """The usage ledger: one row per request, written once (request_id is unique). Billing reads it."""

    class Status(models.TextChoices):
        OK = "ok", "Completed"
        ERROR = "error", "Backend error"
        CANCELLED = "cancelled", "Client disconnected"
        INTERRUPTED = "interrupted", "Backend died mid-stream"

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    request_id = models.CharField(max_length=64, unique=True)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.CharField(max_length=40)
    model = models.CharField(max_length=200)
    adapter = models.CharField(max_length=200, blank=True)
    pool = models.ForeignKey(BackendPool, null=True, on_delete=models.SET_NULL, related_name="+")
    backend = models.ForeignKey(Backend, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    input_tokens = models.PositiveIntegerField(default=0, help_text="Prompt tokens, system prompt included.")
    output_tokens = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=12, choices=Status.choices)
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        indexes = [models.Index(fields=["tenant", "created_at"], name="usage_tenant_time")]
        ordering = ["-created_at"]


class ConfigVersion(models.Model):
    """One row (pk=1), bumped after every change the gateway caches (when Redis is not configured).

    Gateways poll it about twice a second and reload their in-memory snapshot when it moves.
    """

    version = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"config v{self.version}"
