"""A tiny Llama chat model built offline, byte for byte the same on every run.

Tests, the demo and the dev backend need a real causal LM with a chat template and LoRA support but no
network and no downloaded weights. `build_tiny_model` trains a ~500-token byte-level BPE tokenizer on
procedurally generated English and saves a 2-layer Llama (about 0.5 MB, 2 attention heads of 32) with a fixed seed.

CLI: ``python -m devbackend.tinymodel PATH [--model-id ID]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

MARKER = "platform_model.json"
BUILDER_VERSION = 3  # 2: the chat template renders tools, tool calls and tool results; 3: 2 heads of 32 (vLLM serves it)
SEED = 1234

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Each message is `<|role|>content<|end|>`; the assistant's turn ends with `<|end|><|eos|>` so generation stops.
# Tool use (OpenAI's shape, as transformers passes it): the `tools` list is rendered once, first, as
# `<|tools|>[...]<|end|>`; each call of an assistant message follows its content as
# `<|tool_call|>{"name": ..., "arguments": {...}}` (arguments a dict, or a JSON string written as it is); a tool
# result is `<|tool|>content<|end|>`. `<|tools|>`, `<|tool_call|>` and `<|tool|>` are plain text, not special
# tokens, so the vocabulary and the weights are those of builder version 1. Every rendering of a conversation's
# prefix is a prefix of the whole, as `finetune.validation.tokenize_chat_example` needs.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|tools|>' + (tools | tojson) + '<|end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% set arguments = call['function']['arguments'] %}"
    "{{ '<|tool_call|>{\"name\": ' + (call['function']['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ arguments if arguments is string else (arguments | tojson) }}{{ '}' }}"
    "{% endfor %}"
    "{{ '<|end|>' }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our team", "the model", "a student", "the city",
             "this report", "the weather", "your order", "the server", "a small bird", "the river", "she", "he",
             "they", "we", "you", "it"]
_VERBS = ["sees", "likes", "builds", "reads", "writes", "finds", "helps", "moves", "opens", "answers", "checks",
          "sends", "needs", "makes", "takes", "gives", "wants", "learns", "runs", "plays"]
_OBJECTS = ["a book", "the answer", "some water", "the door", "a letter", "the garden", "an apple", "the data",
            "a question", "the music", "the train", "a new plan", "the price", "a message", "the light",
            "three tokens", "the account", "a blue box", "the invoice", "the road"]
_TAILS = ["today", "every day", "in the morning", "at night", "with care", "very fast", "again", "for you",
          "before lunch", "after the rain", "on monday", "in 2024", "at 9 am", "quietly", "once more"]
_CHAT = ["Hello! How can I help you today?", "Thank you for your question.", "Sure, here is a short answer.",
         "I am not sure, but I will try.", "Yes.", "No.", "The answer is 42.", "Please tell me more.",
         "What is the capital of France?", "Paris is the capital of France.", "Can you summarize this text?",
         "Goodbye and have a nice day!"]


def _corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    """English-like sentences and chat phrases: enough structure for BPE to learn useful merges."""
    out = []
    for _ in range(lines):
        if rng.random() < 0.25:
            out.append(rng.choice(_CHAT))
            continue
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        out.append(sentence[0].upper() + sentence[1:] + rng.choice([".", ".", "!", "?", ","]))
    return out


def _train_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=1024, clean_up_tokenization_spaces=False)


def _build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # Head size 32: vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, … only (16 starts, then kills the
    # engine at the first request), and the real-vLLM tests serve this model.
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    # The default std 0.02 gives tied logits too small for LoRA (which cannot touch embeddings) to teach exact answers.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(SEED))
    return model


def _write(path: Path, model_id: str) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = _train_tokenizer(_corpus(random.Random(SEED)))
    model = _build_model(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _canonicalise_json(path)
    (path / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the server may run as another user
    marker = {"model_id": model_id, "builder_version": BUILDER_VERSION}
    (path / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _canonicalise_json(path: Path) -> None:
    """Re-dump every JSON file with sorted keys so the bytes never depend on dict insertion order."""
    for file in sorted(path.glob("*.json")):
        data = json.loads(file.read_text())
        file.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _marker(path: Path) -> dict:
    """The marker is written last: present means the build is complete. It records the served model id."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def read_model_id(path: Path) -> str | None:
    """The model id recorded by `build_tiny_model`, or None when the folder is not a complete build."""
    return _marker(path).get("model_id")


def build_tiny_model(path: Path, *, model_id: str = "platform/tiny-chat") -> Path:
    """Build the tiny model into `path` (idempotent: a complete build with the same id returns at once).

    Files are written into a sibling temporary folder and moved in with the marker last, so a crash or a
    concurrent builder never leaves a folder that looks complete but is not.
    """
    path = Path(path)
    if _marker(path) == {"model_id": model_id, "builder_version": BUILDER_VERSION}:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write(staging, model_id)
        path.mkdir(exist_ok=True)
        for file in sorted(staging.iterdir(), key=lambda f: f.name == MARKER):
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devbackend.tinymodel", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--model-id", default="platform/tiny-chat")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.path, model_id=args.model_id))


if __name__ == "__main__":
    main()
