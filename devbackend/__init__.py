"""A local inference server that speaks TGI's and vLLM's HTTP protocols, quirks included.

It serves a real (tiny) model on CPU with peft adapters, or simulates one for load tests, so the gateway
can be developed and tested without a GPU. Fault injection under /_dev/ is for tests only.
See docs/devbackend.md.
"""

from .app import create_app
from .config import BackendConfig, parse_args
from .runner import run_in_subprocess, run_in_thread, serve

__all__ = ["BackendConfig", "create_app", "parse_args", "run_in_subprocess", "run_in_thread", "serve"]
