"""The base models a tenant can train and what the trainer reads of one: its architecture, its longest row, its
tokenizer."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from serving.models import BaseModel
from serving.selectors import base_models_for_tenant

MAX_SEQ_LEN_CAP = 8192  # longest packed row the trainer is given, whatever the model's context


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
