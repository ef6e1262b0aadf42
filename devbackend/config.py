"""The dev backend's settings and the command line that fills them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

FLAVORS = ("dev", "tgi", "vllm")


@dataclass
class BackendConfig:
    """Everything `create_app` needs. `model` is a local folder; `simulate` serves without any model."""

    model: str | None = None
    model_id: str | None = None  # defaults to the id recorded by devbackend.tinymodel, else the path
    simulate: bool = False
    host: str = "127.0.0.1"
    port: int = 8081
    flavor: str = "dev"
    lora_adapters: dict[str, str] = field(default_factory=dict)
    max_concurrent_requests: int = 16
    max_total_tokens: int = 1024
    max_input_tokens: int | None = None  # defaults to max_total_tokens - 1, as TGI does
    sim_tokens_per_second: float = 500.0
    sim_ttft_ms: float = 5.0
    sim_output_tokens: int | None = None
    sim_tick_ms: float = 10.0

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, not {self.flavor!r}")
        if not self.simulate and not self.model:
            raise ValueError("either a model path or simulate=True is required")
        if self.max_input_tokens is None:
            self.max_input_tokens = self.max_total_tokens - 1


def parse_lora_adapters(value: str) -> dict[str, str]:
    """`name=/path,name2=/path2`; a bare path is refused, as TGI would look it up on the Hub and fail."""
    adapters = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"expected name=/local/path, got {item!r}")
        adapters[name] = path
    return adapters


def parse_args(argv: list[str] | None = None) -> BackendConfig:
    parser = argparse.ArgumentParser(prog="python -m devbackend",
                                     description="Local inference server speaking TGI's and vLLM's HTTP protocols.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="folder with a transformers causal LM (e.g. built by devbackend.tinymodel)")
    source.add_argument("--simulate", action="store_true", help="no model: filler tokens at a fixed rate")
    parser.add_argument("--model-id")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081, help="0 picks a free port (printed at startup)")
    parser.add_argument("--flavor", choices=FLAVORS, default="dev")
    parser.add_argument("--lora-adapters", type=parse_lora_adapters, default={})
    parser.add_argument("--max-concurrent-requests", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=1024)
    parser.add_argument("--max-input-tokens", type=int)
    parser.add_argument("--sim-tokens-per-second", type=float, default=500.0, help="0 emits every token at once")
    parser.add_argument("--sim-ttft-ms", type=float, default=5.0)
    parser.add_argument("--sim-output-tokens", type=int, help="default: the request's max tokens, else 16")
    parser.add_argument("--sim-tick-ms", type=float, default=10.0,
                        help="shortest sleep between writes; due tokens are written together (CPU cost)")
    args = parser.parse_args(argv)
    return BackendConfig(**vars(args))
