"""Exact LoRA adapter sizes for Llama-style models, for memory and capacity planning.

A LoRA pair on a linear layer d_in → d_out adds A (r × d_in) and B (d_out × r): r · (d_in + d_out)
parameters. Summing the real shapes matters: grouped-query attention makes k/v much narrower than
q/o, and the MLP is wider than the hidden size, so the textbook 2·r·d·L is off by tens of percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BYTES_PER_PARAM = {"fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "fp32": 4, "float32": 4}


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that decide LoRA shapes (all counts, not bytes)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> "LlamaShape":
        """Accept a dict or a transformers config; head_dim defaults to hidden / heads, KV heads to heads."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            hidden_size=hidden,
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            intermediate_size=int(get("intermediate_size")),
            head_dim=int(get("head_dim") or hidden // heads),
        )

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(d_in, d_out) of each linear module in one decoder layer."""
        d, q, kv, i = (
            self.hidden_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
            self.intermediate_size,
        )
        return {
            "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d),
        }


def resolve_targets(target_modules: Iterable[str] | str) -> tuple[str, ...]:
    """'all-linear' → every Llama linear layer (not lm_head, as peft does); unknown names raise."""
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"target_modules must be a list of module names or 'all-linear', got {target_modules!r}")
        return LLAMA_LINEAR_MODULES
    targets = tuple(dict.fromkeys(target_modules))
    unknown = [t for t in targets if t not in LLAMA_LINEAR_MODULES]
    if unknown or not targets:
        raise ValueError(f"unknown target modules {unknown}; choose from {list(LLAMA_LINEAR_MODULES)}")
    return targets


def lora_param_count(config: Mapping[str, Any] | Any, r: int, target_modules: Iterable[str] | str = "all-linear") -> int:
    """Exact trainable parameters of one adapter: Σ_layers Σ_modules r · (d_in + d_out)."""
    shape = LlamaShape.from_config(config)
    shapes = shape.module_shapes()
    per_layer = sum(r * sum(shapes[m]) for m in resolve_targets(target_modules))
    return per_layer * shape.num_hidden_layers


def simple_lora_param_count(config: Mapping[str, Any] | Any, r: int) -> int:
    """The textbook 2·r·d·L per adapted module type (square d × d layers); for comparison only."""
    shape = LlamaShape.from_config(config)
    return 2 * r * shape.hidden_size * shape.num_hidden_layers


def lora_bytes(config: Mapping[str, Any] | Any, r: int, target_modules: Iterable[str] | str = "all-linear",
               dtype: str = "bf16") -> int:
    """Bytes of one adapter's weights in memory = params × bytes per parameter (2 fp16/bf16, 4 fp32)."""
    return lora_param_count(config, r, target_modules) * BYTES_PER_PARAM[dtype]


def adapters_that_fit(budget_bytes: int, config: Mapping[str, Any] | Any, r: int,
                      target_modules: Iterable[str] | str = "all-linear", dtype: str = "bf16") -> int:
    """How many whole adapters of this rank/targets fit in a memory budget (bytes); weights only."""
    if budget_bytes < 0:
        raise ValueError("budget_bytes must be >= 0")
    return budget_bytes // lora_bytes(config, r, target_modules, dtype)
