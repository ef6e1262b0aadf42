"""What a job will take, from this platform's data: the training price in force, the worker's measured speed and
loading time, the cost and time preview, and the "auto" hyperparameters (finetune.estimates holds the pure
arithmetic)."""

from __future__ import annotations

import math
from decimal import Decimal
from pathlib import Path

from finetune.estimates import auto_n_epochs, estimate_cost_cents
from finetune.models import FineTuneJob
from serving.models import BaseModel

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


def training_price_cents_per_million(base_model: BaseModel) -> Decimal:
    """Training price of a base model in force today, in cents per million trained tokens (billing's price list)."""
    from billing.periods import utc_today  # billing owns prices; imported here to keep app loading simple
    from billing.prices import PriceBook

    price = PriceBook().resolve(model=base_model.name, adapter="", pool_id=None, day=utc_today())
    return price.training_price if price is not None else Decimal(DEFAULT_TRAINING_PRICE_CENTS_PER_MILLION)


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


def auto_n_epochs_for(n_examples: int) -> int:
    return auto_n_epochs(max(1, n_examples))


# ---- merged models (finetune/merge.py): what one takes on its dedicated pool --------------------------------------

# vLLM's default share of each GPU's memory it takes for weights, activations and the KV cache (--gpu-memory-utilization).
GPU_MEMORY_UTILIZATION = 0.9
SERVING_BYTES_PER_PARAM = 2  # bf16 / fp16 on a GPU


def merged_model_plan(*, pool, merged=None) -> dict:
    """A merged model on its dedicated pool: its size, and the GPU memory one backend needs to serve it.

    Size: the merged folder's weights as exported (`merged.weights_bytes`, the base model's dtype), else the base
    model's own .safetensors (a merged model has exactly the base model's parameters). On the GPU the weights are
    bf16 (2 bytes a parameter) and the KV cache holds 2 · layers · KV heads · head dim values of 2 bytes per token; the
    need is the weights plus the KV cache of the pool's capacity (concurrent requests) at the full context, against
    `GPU_MEMORY_UTILIZATION` of the pool's `gpu_memory_gb` (0: unknown, no verdict). Integers (bytes) throughout;
    `known` False (and the figures None) when the base model's architecture is not known (no config.json, no fields).
    """
    from finetune import lora_math
    from finetune.base_models import model_config

    base = pool.base_model
    config = model_config(base)
    try:
        shape = lora_math.LlamaShape.from_config(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # staff have not filled in the architecture
        shape = None
    if shape is None or not shape.num_hidden_layers:
        unknown = dict.fromkeys(("weights_on_disk_bytes", "weights_gpu_bytes", "kv_bytes_per_token", "concurrency",
                                 "kv_cache_bytes", "need_bytes", "gpu_memory_bytes", "available_bytes", "fits"))
        return {**unknown, "parameters": merged.parameters if merged is not None else None,
                "context_length": base.context_length, "known": False}
    vocab = int(config.get("vocab_size") or 0)
    tied = bool(config.get("tie_word_embeddings", False))
    per_layer = sum(d_in * d_out for d_in, d_out in shape.module_shapes().values()) + 2 * shape.hidden_size
    parameters = (merged.parameters if merged is not None and merged.parameters else
                  shape.num_hidden_layers * per_layer + vocab * shape.hidden_size * (1 if tied else 2) + shape.hidden_size)
    if merged is not None and merged.weights_bytes:
        weights_on_disk = merged.weights_bytes
    else:
        weights_on_disk = 0
        if base.local_path:
            weights_on_disk = sum(f.stat().st_size for f in Path(base.local_path).glob("*.safetensors"))
    kv_per_token = 2 * shape.num_hidden_layers * shape.num_key_value_heads * shape.head_dim * SERVING_BYTES_PER_PARAM
    concurrency = pool.capacity or sum(b.max_concurrency for b in pool.backends.filter(enabled=True)) or 1
    kv_bytes = kv_per_token * base.context_length * concurrency
    weights_gpu = parameters * SERVING_BYTES_PER_PARAM
    need = weights_gpu + kv_bytes
    available = int(pool.gpu_memory_gb * 1024 ** 3 * GPU_MEMORY_UTILIZATION)
    return {
        "parameters": parameters, "weights_on_disk_bytes": weights_on_disk, "weights_gpu_bytes": weights_gpu,
        "kv_bytes_per_token": kv_per_token, "concurrency": concurrency, "context_length": base.context_length,
        "kv_cache_bytes": kv_bytes, "need_bytes": need, "gpu_memory_bytes": pool.gpu_memory_gb * 1024 ** 3,
        "available_bytes": available, "fits": (need <= available) if pool.gpu_memory_gb else None, "known": True,
    }
