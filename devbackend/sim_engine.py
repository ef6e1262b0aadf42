"""A model-free engine for load tests: filler tokens at a configured rate, nearly no CPU per token.

Prompt tokens are counted as ceil(characters / 4) (the usual rule of thumb for English), so counts are
deterministic and cost nothing. This module must not import torch: the simulated server stays light.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator, Sequence

from .config import BackendConfig
from .protocol import Cancellation, GenerationParams, Token

_WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
          "dolore magna aliqua").split()
_EOS = "<|eos|>"
_EOS_ID = 2
_FIRST_WORD_ID = 100
_DEFAULT_OUTPUT_TOKENS = 16


class SimEngine:
    compute_type = "simulated"

    def __init__(self, config: BackendConfig):
        self.model_id = config.model_id or "sim/model"
        self.adapters = dict(config.lora_adapters)
        self._output_tokens = config.sim_output_tokens
        self._ttft_s = config.sim_ttft_ms / 1000
        self._interval_s = 1 / config.sim_tokens_per_second if config.sim_tokens_per_second > 0 else 0.0
        self._tick_s = config.sim_tick_ms / 1000

    def encode(self, text: str) -> Sequence[int]:
        return range((len(text) + 3) // 4)

    def tokenize(self, text: str) -> list[dict]:
        return [{"id": _FIRST_WORD_ID + i // 4, "text": text[i:i + 4], "start": i, "stop": min(i + 4, len(text))}
                for i in range(0, len(text), 4)]

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The tiny model's template, roughly (only the prompt's length matters here)."""
        head = f"<|tools|>{json.dumps(tools)}<|end|>" if tools else ""
        turns = "".join(f"<|{m['role']}|>{m.get('content') or ''}{json.dumps(m.get('tool_calls')) if m.get('tool_calls') else ''}<|end|>"
                        for m in messages)
        return f"<|bos|>{head}{turns}<|assistant|>"

    async def load_adapter(self, name: str, path: str) -> None:
        self.adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        del self.adapters[name]

    def _tokens(self, params: GenerationParams) -> list[Token]:
        wanted = self._output_tokens or params.requested_max_new_tokens or _DEFAULT_OUTPUT_TOKENS
        count = min(wanted, params.max_new_tokens)
        tokens = [Token(_FIRST_WORD_ID + i % len(_WORDS), " " + _WORDS[i % len(_WORDS)], -1.0, False)
                  for i in range(count)]
        if count < params.max_new_tokens:  # the "model" chose to stop: end on an EOS token, as a real one would
            tokens[-1] = Token(_EOS_ID, _EOS, -0.1, True, "eos_token")
        else:
            tokens[-1].finish_reason = "length"
        return tokens

    async def stream(self, prompt: Sequence[int], params: GenerationParams, adapter: str | None,
                     cancel: Cancellation) -> AsyncIterator[list[Token]]:
        tokens = self._tokens(params)
        if self._ttft_s:
            await asyncio.sleep(self._ttft_s)
        interval = params.token_delay_s or self._interval_s
        if not interval:
            yield tokens
            return
        loop = asyncio.get_running_loop()
        start, sent = loop.time(), 0
        while sent < len(tokens) and not cancel.is_set():
            due = min(len(tokens), int((loop.time() - start) / interval) + 1)
            yield tokens[sent:due]
            sent = due
            if sent < len(tokens):
                await asyncio.sleep(max(start + sent * interval - loop.time(), self._tick_s))
