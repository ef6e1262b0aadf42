"""Where a tenant's adapters are served: the pools it may use, the one an adapter is published to, the highest
rank they serve, and the capacity planner (adapters per backend, the cost of serving N tenants)."""

from __future__ import annotations

import math

from django.db.models import Max

from finetune import lora_math
from finetune.base_models import model_config
from serving import selectors as serving_selectors
from serving.models import BackendPool, BaseModel


def pools_for_tenant(tenant):
    """Pools the tenant's traffic may use: shared ones and those dedicated to it."""
    return BackendPool.objects.reachable_by(tenant).select_related("base_model")


def pool_for_adapter(tenant, base_model: BaseModel) -> BackendPool | None:
    """Where an adapter is published: the pool that serves its base model to the tenant, by the rule the gateway
    routes by (serving.selectors.pool_for: its dedicated pool, else a shared one, those with backends first)."""
    return serving_selectors.pool_for(tenant, base_model)


def max_lora_rank_served(tenant, base_model: BaseModel) -> int | None:
    """The highest LoRA rank a pool of `base_model` that the tenant may use serves; None when no pool serves it."""
    return pools_for_tenant(tenant).filter(base_model=base_model).aggregate(m=Max("max_lora_rank"))["m"]


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
