"""LoRA adapters of the tiny model as peft writes them: adapter_config.json and .safetensors bytes of given shapes."""

from __future__ import annotations

DIMS = {"q_proj": (64, 64), "k_proj": (64, 64), "v_proj": (64, 64), "o_proj": (64, 64),
        "gate_proj": (64, 176), "up_proj": (64, 176), "down_proj": (176, 64)}


def lora_config(**overrides) -> dict:
    """adapter_config.json as peft 0.21 writes it for a LoRA of the tiny model."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "platform/tiny-chat",
              "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["down_proj", "q_proj", "v_proj"],
              "bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False, "rank_pattern": {},
              "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None, "lora_bias": False,
              "inference_mode": True, "peft_version": "0.21.2"}
    return {**config, **overrides}


def tensors_for(rank: int = 4, targets=("down_proj", "q_proj", "v_proj"), layers: int = 2) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for layer in range(layers):
        for module in targets:
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            d_in, d_out = DIMS[module]
            stem = f"base_model.model.model.layers.{layer}.{block}.{module}"
            shapes[f"{stem}.lora_A.weight"] = (rank, d_in)
            shapes[f"{stem}.lora_B.weight"] = (d_out, rank)
    return shapes


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], dtype: str = "float32") -> bytes:
    """A real .safetensors file (the safetensors package's writer) with these tensors."""
    import numpy as np
    from safetensors.numpy import save

    return save({name: np.full(shape, 0.01, dtype=dtype) for name, shape in shapes.items()}, metadata={"format": "pt"})

