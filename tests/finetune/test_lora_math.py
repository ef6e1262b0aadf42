"""LoRA size arithmetic against the reference figures and against peft's own count."""

import pytest

from finetune.lora_math import (
    adapters_that_fit,
    lora_bytes,
    lora_param_count,
    simple_lora_param_count,
)

LLAMA2_70B = {
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
}


def test_llama2_70b_reference_figures():
    assert lora_param_count(LLAMA2_70B, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]) == 65_536_000
    assert lora_param_count(LLAMA2_70B, 16, "all-linear") == 207_093_760
    assert simple_lora_param_count(LLAMA2_70B, 16) == 20_971_520
    assert lora_bytes(LLAMA2_70B, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], "fp16") == 131_072_000
    assert lora_bytes(LLAMA2_70B, 16, "all-linear", "fp32") == 4 * 207_093_760


def test_capacity_planning():
    one = lora_bytes(LLAMA2_70B, 16, "all-linear")
    assert adapters_that_fit(1000 * one, LLAMA2_70B, 16) == 1000
    assert adapters_that_fit(1000 * one - 1, LLAMA2_70B, 16) == 999
    assert adapters_that_fit(0, LLAMA2_70B, 16) == 0


def test_bad_targets_raise():
    with pytest.raises(ValueError):
        lora_param_count(LLAMA2_70B, 16, ["q_proj", "qkv_proj"])
    with pytest.raises(ValueError):
        lora_param_count(LLAMA2_70B, 16, "q_proj")  # a string is a regex in peft: refuse it here


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear"])
def test_matches_peft_trainable_parameters(targets):
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, vocab_size=300)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_param_count(config, 8, targets) == trainable
