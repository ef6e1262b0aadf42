"""Reads for fine-tuning: trainable base models, prices, token counts, estimates, pools and the capacity planner."""

from __future__ import annotations

import functools
import json
import math
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.db.models import Max

from finetune import lora_math
from finetune.models import FineTuneJob, TrainingFile
from finetune.estimates import auto_n_epochs, estimate_cost_cents
from serving import selectors as serving_selectors
from serving.models import BackendPool, BaseModel
from serving.selectors import base_models_for_tenant

# Used when staff have set no training price for a base model (cents per million trained tokens, OpenAI's
# gpt-4o-mini rate). Read prices only through `training_price_cents_per_million`.
DEFAULT_TRAINING_PRICE_CENTS_PER_MILLION = 300
# Time preview before any job of a base model has run here (tokens/s of one worker; measured ones replace it).
DEFAULT_TRAINING_TOKENS_PER_SECOND = 5_000
# Loading before the first step, until a job of the base model has measured it: a fixed part (imports, tokenizer)
# plus reading the weights at this rate (bytes/s).
DEFAULT_LOAD_SECONDS = 3.0
DEFAULT_LOAD_BYTES_PER_SECOND = 250_000_000
# "auto" learning rate: the base model's rate suits long runs; a job of few optimizer steps gets it multiplied by
# sqrt(AUTO_LR_REFERENCE_STEPS / steps), at most AUTO_LR_MAX_MULTIPLIER (see auto_learning_rate_multiplier).
AUTO_LR_REFERENCE_STEPS = 1000
AUTO_LR_MAX_MULTIPLIER = 10.0
MAX_SEQ_LEN_CAP = 8192  # longest packed row the trainer is given, whatever the model's context


def training_price_cents_per_million(base_model: BaseModel) -> Decimal:
    """Training price of a base model in force today, in cents per million trained tokens (billing's price list)."""
    from billing.rating import (  # billing owns prices; imported here to keep app loading simple
        PriceBook,
        utc_today,
    )

    price = PriceBook().resolve(model=base_model.name, adapter="", pool_id=None, day=utc_today())
    return price.training_price if price is not None else Decimal(DEFAULT_TRAINING_PRICE_CENTS_PER_MILLION)


def storage_root() -> Path:
    return Path(settings.STORAGE_DIR)


def tenant_storage_dir(tenant_id: int) -> Path:
    """Every file of a tenant lives under STORAGE_DIR/tenants/<tenant id>/."""
    return storage_root() / "tenants" / str(int(tenant_id))


def job_output_dir(job: FineTuneJob) -> Path:
    return tenant_storage_dir(job.tenant_id) / "jobs" / job.id


def training_file_open(file: TrainingFile) -> BinaryIO:
    """The stored bytes as a binary stream (validation and the trainer read it line by line, the download in blocks)."""
    return open(storage_root() / file.path, "rb")


def training_file_lines(file: TrainingFile, wanted: set[int], *, max_chars: int = 300) -> dict[int, str]:
    """The first `max_chars` characters of the lines numbered in `wanted` (1-based), read up to the last of them
    without holding more than one line's head: a long line is skipped through, not loaded."""
    found: dict[int, str] = {}
    last = max(wanted, default=0)
    with training_file_open(file) as stream:
        for n in range(1, last + 1):
            head = stream.readline(4 * max_chars)  # UTF-8: at most 4 bytes a character
            if not head:
                break
            if n in wanted:
                found[n] = head.rstrip(b"\r\n").decode("utf-8", "replace")[:max_chars]
            while not head.endswith(b"\n") and (head := stream.readline(64 * 1024)):
                pass
    return found


# ---- base models ---------------------------------------------------------------------------------


def trainable_base_models(tenant) -> list[BaseModel]:
    """The tenant's base models this platform can train (weights on local disk)."""
    return [bm for bm in base_models_for_tenant(tenant) if bm.local_path]


def model_config(base_model: BaseModel) -> dict:
    """The architecture for LoRA sizes: config.json in the weights folder, else the BaseModel's own fields."""
    if base_model.local_path:
        try:
            return json.loads((Path(base_model.local_path) / "config.json").read_text())
        except (OSError, ValueError):
            pass
    return {
        "hidden_size": base_model.hidden_size, "num_hidden_layers": base_model.num_layers,
        "num_attention_heads": base_model.num_attention_heads,
        "num_key_value_heads": base_model.num_key_value_heads or base_model.num_attention_heads,
        "intermediate_size": base_model.intermediate_size,
    }


def max_seq_len(base_model: BaseModel) -> int:
    return max(16, min(base_model.context_length, MAX_SEQ_LEN_CAP))


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer_for(base_model: BaseModel | None):
    """The base model's tokenizer, or None when it has no local weights or transformers is not installed here."""
    if base_model is None or not base_model.local_path:
        return None
    try:
        return _tokenizer(base_model.local_path)
    except Exception:  # no transformers in the web image, or an unreadable folder: counts are then estimated
        return None


def file_token_counts(file: TrainingFile, base_model: BaseModel) -> dict | None:
    """Tokens of a file with a base model's chat template, as a worker counted them: {total_tokens, trainable_tokens,
    examples, estimated, min_tokens, max_tokens, problems}; None until counted (services.training_file_request_token_count
    asks a worker; nothing is tokenized in a request)."""
    return file.token_counts.get(base_model.name) or None


def estimated_token_counts(file: TrainingFile) -> dict:
    """Tokens of a file estimated from its size (4 bytes a token), until a worker has counted them, and so marked."""
    return {"total_tokens": math.ceil(file.bytes / 4), "trainable_tokens": None, "examples": file.examples,
            "estimated": True, "min_tokens": None, "max_tokens": None, "problems": []}


def training_tokens_per_second(base_model: BaseModel) -> float:
    """Throughput of the latest finished job on this base model (any tenant: it is the worker's speed)."""
    # all_tenants: the worker's measured speed, not any tenant's data.
    latest = (FineTuneJob.all_tenants.filter(base_model=base_model, status=FineTuneJob.Status.SUCCEEDED,
                                             tokens_per_second__gt=0)
              .order_by("-finished_at").values_list("tokens_per_second", flat=True).first())
    return latest or DEFAULT_TRAINING_TOKENS_PER_SECOND


def training_load_seconds(base_model: BaseModel) -> float:
    """Seconds a worker spends loading this base model and the data before the first step: as measured by the latest
    finished job on it, else estimated from the size of its weights."""
    # all_tenants: the worker's measured loading time, not any tenant's data.
    latest = (FineTuneJob.all_tenants.filter(base_model=base_model, status=FineTuneJob.Status.SUCCEEDED,
                                             load_seconds__isnull=False)
              .order_by("-finished_at").values_list("load_seconds", flat=True).first())
    if latest is not None:
        return latest
    weights = 0
    if base_model.local_path:
        try:
            weights = sum(f.stat().st_size for f in Path(base_model.local_path).glob("*.safetensors"))
        except OSError:
            pass
    return DEFAULT_LOAD_SECONDS + weights / DEFAULT_LOAD_BYTES_PER_SECOND


def estimate(*, base_model: BaseModel, tokens_per_epoch: int, n_epochs: int) -> dict:
    """The cost and time preview: trained tokens = file tokens × epochs; cost rounded up to a cent. Time = loading
    the base model (seconds) + trained tokens at the worker's measured speed."""
    price = training_price_cents_per_million(base_model)
    trained = tokens_per_epoch * n_epochs
    speed = training_tokens_per_second(base_model)
    load = training_load_seconds(base_model)
    return {
        "trained_tokens": trained,
        "price_cents_per_million_tokens": f"{price.normalize():f}",  # a decimal string: exact money
        "estimated_cost_cents": estimate_cost_cents(tokens_per_epoch, n_epochs, price),
        "estimated_seconds": math.ceil(load + trained / speed) if speed else None,
        "load_seconds": round(load, 1),
        "tokens_per_second": speed,
    }


def auto_batch_size(n_examples: int) -> int:
    """'auto' batch size: a quarter of a small file, at most 8 examples a step; about 0.2 % of a large one (OpenAI's
    rule), at most 256."""
    return max(1, min(8, n_examples // 4), min(256, math.ceil(n_examples * 0.002)))


def auto_learning_rate_multiplier(total_steps: int) -> float:
    """'auto' multiplier of the base model's learning rate: sqrt(1000 / optimizer steps), between 1 and 10.

    Adam moves each weight by about the learning rate per step, so a job of a few dozen steps (a few dozen examples,
    OpenAI's 3 epochs, batches of 8) at LoRA's usual 2e-4 ends before it has learnt (loss 0.6-0.7 on the demo
    model); at ~1.6e-3 it learns the behaviour within the first epoch. Long jobs keep the base model's rate.
    """
    return round(min(AUTO_LR_MAX_MULTIPLIER, max(1.0, math.sqrt(AUTO_LR_REFERENCE_STEPS / max(1, total_steps)))), 2)


def max_lora_rank_served(tenant, base_model: BaseModel) -> int | None:
    """The highest LoRA rank a pool of `base_model` that the tenant may use serves; None when no pool serves it."""
    return pools_for_tenant(tenant).filter(base_model=base_model).aggregate(m=Max("max_lora_rank"))["m"]


def auto_n_epochs_for(n_examples: int) -> int:
    return auto_n_epochs(max(1, n_examples))


# ---- jobs ----------------------------------------------------------------------------------------


def active_job_count(tenant) -> int:
    return FineTuneJob.objects.for_tenant(tenant).filter(status__in=FineTuneJob.ACTIVE_STATUSES).count()


def loss_series(job: FineTuneJob) -> list[dict]:
    """Metrics events in step order, for the loss chart: [{step, train_loss, valid_loss}]."""
    rows = job.events.filter(type="metrics").order_by("id").values_list("data", flat=True)
    return [{"step": d.get("step"), "train_loss": d.get("train_loss"), "valid_loss": d.get("valid_loss")}
            for d in rows if d.get("step") is not None]


# ---- pools and capacity --------------------------------------------------------------------------


def pools_for_tenant(tenant):
    """Pools the tenant's traffic may use: shared ones and those dedicated to it."""
    return BackendPool.objects.reachable_by(tenant).select_related("base_model")


def pool_for_adapter(tenant, base_model: BaseModel) -> BackendPool | None:
    """Where an adapter is published: the pool that serves its base model to the tenant, by the rule the gateway
    routes by (serving.selectors.pool_for: its dedicated pool, else a shared one, those with backends first)."""
    return serving_selectors.pool_for(tenant, base_model)


def capacity_plan(*, pool: BackendPool, rank: int, target_modules, memory_budget_gb: float, dtype: str = "bf16") -> dict:
    """Exact adapters-that-fit beside the 2·r·d·L estimate, and the cost of serving N tenants.

    `rank` must be one the pool serves (≤ `pool.max_lora_rank`; ValueError otherwise). vLLM reserves every adapter
    slot for its --max-lora-rank whatever the adapter's own rank, so on a vLLM pool adapters are counted at the
    pool's maximum rank (`slot_rank`). Shared base: one backend holds the base once plus up to `per_backend`
    adapters, so N tenants need ceil(N / per_backend) backends. Isolated: one backend per tenant. Costs in cents per
    hour (integers).
    """
    if rank > pool.max_lora_rank:
        raise ValueError(f"rank {rank} is above the {pool.name} pool's maximum LoRA rank ({pool.max_lora_rank})")
    slot_rank = pool.max_lora_rank if pool.kind == BackendPool.Kind.VLLM else rank
    config = model_config(pool.base_model)
    budget = int(memory_budget_gb * 1024 ** 3)
    exact_params = lora_math.lora_param_count(config, slot_rank, target_modules)
    simple_params = lora_math.simple_lora_param_count(config, slot_rank)
    per_param = lora_math.BYTES_PER_PARAM[dtype]
    per_backend = lora_math.adapters_that_fit(budget, config, slot_rank, target_modules, dtype)
    hourly = pool.gpu_hourly_cost_cents
    scenarios = []
    for n in (10, 100, 1000):
        shared = math.ceil(n / per_backend) if per_backend else None
        scenarios.append({"tenants": n, "shared_backends": shared,
                          "shared_cents_per_hour": shared * hourly if shared else None,
                          "isolated_backends": n, "isolated_cents_per_hour": n * hourly})
    return {
        "exact_params": exact_params, "exact_bytes": exact_params * per_param,
        "simple_params": simple_params, "simple_bytes": simple_params * per_param,
        "adapters_that_fit": per_backend,
        "adapters_that_fit_simple": budget // (simple_params * per_param) if simple_params else 0,
        "budget_bytes": budget, "scenarios": scenarios, "hourly_cents": hourly,
        "rank": rank, "slot_rank": slot_rank, "max_lora_rank": pool.max_lora_rank,
    }
