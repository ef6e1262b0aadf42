"""Fine-tuning rows: uploaded files, jobs with their events and checkpoints, and the trained-tokens ledger.

Ids are OpenAI-shaped strings (`file-…`, `ftjob-…`, random) so the API can hand them out unchanged; events and
checkpoints keep integer keys and show them only through `public_ids` (`ftevent-…`, `ftckpt-…`, opaque). Every model is
tenant-owned (`Model.objects.for_tenant(t)`); the trained adapter itself is a `serving.Adapter`.
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from finetune import public_ids
from finetune.templating import SystemPrompt
from tenants.scoping import TenantOwnedModel

# A worker refreshes its lease about once a second while training; one silent this long is presumed dead and
# its job may be claimed again (it resumes from its last checkpoint). Generous: loading a large base model
# happens before the first heartbeat of the training loop. PLATFORM_FINETUNE_LEASE_SECONDS (tests shorten it).
LEASE_SECONDS = settings.FINETUNE_LEASE_SECONDS


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def new_file_id() -> str:
    return _new_id("file")


def new_job_id() -> str:
    return _new_id("ftjob")


class TrainingFile(TenantOwnedModel):
    """An uploaded JSONL file (`purpose=fine-tune`) and its full validation report.

    `uploaded` (OpenAI's status) until a worker has validated it (finetune.services.training_file_validate), with its
    progress in `lines_validated` / `bytes_validated`; then `processed` or `error`, the report written once. A
    tenant's uploads are validated one at a time, in upload order (`validation_queued_at`).
    """

    class Status(models.TextChoices):
        UPLOADED = "uploaded", "Validating"
        PROCESSED = "processed", "Valid"
        ERROR = "error", "Has problems"

    id = models.CharField(primary_key=True, max_length=40, default=new_file_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=32, default="fine-tune")
    bytes = models.PositiveBigIntegerField(default=0)
    path = models.CharField(max_length=500, help_text="Relative to STORAGE_DIR.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UPLOADED)
    # The base model named at upload: validation also counts tokens with its chat template.
    base_model = models.ForeignKey("serving.BaseModel", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    lines_validated = models.PositiveBigIntegerField(default=0)
    bytes_validated = models.PositiveBigIntegerField(default=0)
    progress_at = models.DateTimeField(null=True, blank=True, help_text="The validating worker's last progress write.")
    # A tenant's files are validated one at a time, oldest first (finetune.services.training_file_validation_next):
    # set when this one's validation is sent to a worker; null while it waits for the tenant's file before it.
    validation_queued_at = models.DateTimeField(null=True, blank=True,
                                                help_text="When its validation was sent to a worker (null: waiting its turn).")
    validated_at = models.DateTimeField(null=True, blank=True)
    # validate_stream(...).to_dict(): {ok, problems[{line,path,code,message}], problems_omitted, stats}
    validation = models.JSONField(default=dict, blank=True)
    # Per base model name: {"total_tokens", "trainable_tokens", "examples", "problems"} with that model's tokenizer.
    token_counts = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"

    @property
    def is_valid(self) -> bool:
        return self.status == self.Status.PROCESSED

    @property
    def is_validating(self) -> bool:
        return self.status == self.Status.UPLOADED

    @property
    def examples(self) -> int:
        return (self.validation.get("stats") or {}).get("examples") or 0

    @property
    def progress_percent(self) -> int:
        """How much of the file validation has read, 0-100 (100 once it is validated)."""
        if not self.is_validating:
            return 100
        return min(100, 100 * self.bytes_validated // self.bytes) if self.bytes else 0

    @property
    def progress_text(self) -> str:
        """The validation's progress in words, for messages and the console."""
        if not self.is_validating:
            return "validated"
        if self.validation_queued_at is None:
            return "waiting for this account's earlier uploads to be validated first"
        if not self.bytes_validated:
            return "waiting for a worker to validate it"
        return (f"{self.progress_percent} % validated: {self.lines_validated:,} lines, {self.bytes_validated:,} of "
                f"{self.bytes:,} bytes")


class SystemPromptSnapshot(models.Model):
    """Which system prompt a job trains with (an evaluation scores with), recorded at its creation
    (finetune.services.system_prompt_snapshot): the tenant's active SystemPromptVersion's number and text as the gateway
    serves it, and the tenant's system_message_rule then. Blank text: none (opted out, or the tenant had none)."""

    system_prompt_version = models.PositiveIntegerField(null=True, blank=True,
                                                        help_text="The tenant's prompt version trained with (null: none).")
    system_prompt = models.TextField(blank=True, help_text="That version's text, as served (blank: no system prompt).")
    system_message_rule = models.CharField(max_length=8, default="keep", help_text="keep | replace, as the gateway's.")

    class Meta:
        abstract = True

    @property
    def system_prompt_used(self) -> SystemPrompt | None:
        """What the trainer and evaluations render every example with (finetune.templating.with_system_prompt)."""
        return SystemPrompt(self.system_prompt, self.system_message_rule) if self.system_prompt else None

    @property
    def system_prompt_data(self) -> dict | None:
        """The API's `system_prompt`: {"version", "rule"}, or None when no system prompt is used."""
        return self.describe(self.system_prompt_version, self.system_prompt, self.system_message_rule)

    @staticmethod
    def describe(system_prompt_version: int | None, system_prompt: str, system_message_rule: str) -> dict | None:
        """`system_prompt_data` of these field values (a row's, or a snapshot's before the row exists)."""
        return {"version": system_prompt_version, "rule": system_message_rule} if system_prompt else None


class FineTuneJob(TenantOwnedModel, SystemPromptSnapshot):
    class Status(models.TextChoices):
        VALIDATING_FILES = "validating_files", "Validating files"
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE_STATUSES = (Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING)
    FINISHED_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    id = models.CharField(primary_key=True, max_length=40, default=new_job_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    base_model = models.ForeignKey("serving.BaseModel", on_delete=models.PROTECT, related_name="+")
    training_file = models.ForeignKey(TrainingFile, on_delete=models.PROTECT, related_name="+")
    validation_file = models.ForeignKey(TrainingFile, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    suffix = models.CharField(max_length=64, blank=True)
    seed = models.IntegerField(default=0)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    # Resolved numbers: {"n_epochs", "batch_size", "learning_rate_multiplier"}; as requested (maybe "auto"):
    hyperparameters = models.JSONField(default=dict)
    requested_hyperparameters = models.JSONField(default=dict, blank=True)
    # OpenAI's `method.type`: "supervised" (chat data, next-token loss) or "dpo" (preference data, DPO loss).
    method = models.CharField(max_length=16, default="supervised",
                              help_text="Training method: supervised or dpo (OpenAI's method.type).")
    lora = models.JSONField(default=dict, help_text="{rank, alpha, dropout, target_modules}")
    metadata = models.JSONField(default=dict, blank=True)
    fine_tuned_model = models.CharField(max_length=200, blank=True)
    adapter = models.ForeignKey("serving.Adapter", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    trained_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    estimated_cost_cents = models.PositiveBigIntegerField(default=0)
    step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    train_loss = models.FloatField(null=True, blank=True)
    tokens_per_second = models.FloatField(null=True, blank=True)
    load_seconds = models.FloatField(null=True, blank=True, help_text="Loading the base model and the data, before the first step.")
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    error_param = models.CharField(max_length=64, blank=True)
    # The lease: who runs it and when it last said so. An expired lease means the worker died.
    worker_id = models.CharField(max_length=64, blank=True)
    worker_heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_by_key = models.ForeignKey("tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    estimated_finish = models.DateTimeField(null=True, blank=True)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "status"], name="ftjob_tenant_status")]

    def __str__(self) -> str:
        return self.id

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE_STATUSES

    @property
    def lease_expired(self) -> bool:
        return self.worker_heartbeat_at is None or self.worker_heartbeat_at < timezone.now() - timedelta(seconds=LEASE_SECONDS)

    @property
    def progress_percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        return int(100 * self.step / self.total_steps) if self.total_steps else 0


class JobEvent(TenantOwnedModel):
    class Level(models.TextChoices):
        INFO = "info", "Info"
        WARN = "warn", "Warning"
        ERROR = "error", "Error"

    class Type(models.TextChoices):
        MESSAGE = "message", "Message"
        METRICS = "metrics", "Metrics"

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    type = models.CharField(max_length=8, choices=Type.choices, default=Type.MESSAGE)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    PUBLIC_ID_PREFIX = "ftevent"

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-id"]

    @property
    def public_id(self) -> str:
        """Opaque: the pk is a sequence across all tenants (finetune/public_ids.py)."""
        return public_ids.encode(self.PUBLIC_ID_PREFIX, self.pk)


class JobCheckpoint(TenantOwnedModel):
    """An epoch-end checkpoint the trainer wrote (and a re-claimed job resumes from)."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    job = models.ForeignKey(FineTuneJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    epoch = models.PositiveIntegerField()
    path = models.CharField(max_length=500)
    metrics = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    PUBLIC_ID_PREFIX = "ftckpt"

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-step"]
        constraints = [models.UniqueConstraint(fields=["job", "step"], name="one_checkpoint_per_job_step")]

    @property
    def public_id(self) -> str:
        """Opaque: the pk is a sequence across all tenants (finetune/public_ids.py)."""
        return public_ids.encode(self.PUBLIC_ID_PREFIX, self.pk)


class TrainingUsage(TenantOwnedModel):
    """The trained-tokens ledger billing reads: one row per job, written once when the job ends.

    A cancelled job records the tokens of its completed steps only.
    """

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.PROTECT, related_name="+")
    job = models.OneToOneField(FineTuneJob, on_delete=models.PROTECT, related_name="usage")
    base_model = models.CharField(max_length=100)
    trained_tokens = models.PositiveBigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "created_at"], name="trainusage_tenant_time")]


def new_evaluation_id() -> str:
    return _new_id("eval")


class Evaluation(TenantOwnedModel, SystemPromptSnapshot):
    """An evaluation of one of the tenant's adapters or checkpoints against one of its chat files, base vs adapter
    (finetune/evaluation.py). Run on a worker; `rows_done` of `rows_total` while it runs. `metrics`:
    {"base": {...}, "adapter": {...}} with exact_match, contains (fractions of rows), loss (mean token NLL)."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    FINISHED_STATUSES = (Status.SUCCEEDED, Status.FAILED)

    id = models.CharField(primary_key=True, max_length=40, default=new_evaluation_id, editable=False)
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    base_model = models.ForeignKey("serving.BaseModel", on_delete=models.PROTECT, related_name="+")
    model = models.CharField(max_length=300, help_text="What the tenant named: ft:…, ftckpt-… or ftjob-….")
    adapter = models.ForeignKey("serving.Adapter", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    checkpoint = models.ForeignKey(JobCheckpoint, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    file = models.ForeignKey(TrainingFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    file_name = models.CharField(max_length=255, blank=True)
    max_tokens = models.PositiveIntegerField(default=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    rows_total = models.PositiveIntegerField(default=0)
    rows_done = models.PositiveIntegerField(default=0)
    rows_skipped = models.PositiveIntegerField(default=0)
    metrics = models.JSONField(default=dict, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    worker_id = models.CharField(max_length=64, blank=True)
    worker_heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    created_by_key = models.ForeignKey("tenants.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta(TenantOwnedModel.Meta):
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.id

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED_STATUSES

    @property
    def progress_percent(self) -> int:
        if self.status == self.Status.SUCCEEDED:
            return 100
        return min(100, 100 * self.rows_done // self.rows_total) if self.rows_total else 0


class EvaluationRow(TenantOwnedModel):
    """One row of an evaluation: the prompt, the expected answer, and each side's answer and scores."""

    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="+")
    evaluation = models.ForeignKey(Evaluation, on_delete=models.CASCADE, related_name="rows")
    index = models.PositiveIntegerField(help_text="0-based position among the evaluated rows.")
    line = models.PositiveIntegerField(help_text="Line in the file.")
    prompt = models.JSONField(default=list, help_text="The messages before the expected answer.")
    expected = models.TextField()
    base_answer = models.TextField()
    adapter_answer = models.TextField()
    base_exact = models.BooleanField()
    adapter_exact = models.BooleanField()
    base_contains = models.BooleanField()
    adapter_contains = models.BooleanField()
    base_loss = models.FloatField()
    adapter_loss = models.FloatField()
    answer_tokens = models.PositiveIntegerField()

    class Meta(TenantOwnedModel.Meta):
        ordering = ["index"]
        constraints = [models.UniqueConstraint(fields=["evaluation", "index"], name="one_evaluation_row_per_index")]

    @property
    def differs(self) -> bool:
        return self.base_answer != self.adapter_answer
