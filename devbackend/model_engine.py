"""Real generation with transformers on CPU: token by token with a KV cache, peft adapters by name.

Each generation runs in a worker thread; the model lock is held for one forward step at a time, so
concurrent requests interleave (each with its own KV cache and adapter) and the event loop stays free.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from devbackend.tinymodel import read_model_id

from .config import BackendConfig
from .protocol import BackendError, Cancellation, GenerationParams, Token
from .tools import template_messages

_DONE = object()


class ModelEngine:
    compute_type = "cpu"

    def __init__(self, config: BackendConfig):
        self.model_id = config.model_id or read_model_id(Path(config.model)) or config.model
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.base = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
        self.peft: PeftModel | None = None
        self.adapters: dict[str, str] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=config.max_concurrent_requests,
                                            thread_name_prefix="devbackend-gen")
        self._special_ids = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        # Control tokens that do not end a turn (role markers, padding, BOS) are never generated, as a trained model
        # would not: the random-weight demo base model otherwise answers with role markers, i.e. no text.
        self._never = torch.tensor(sorted(self._special_ids - self._turn_enders()), dtype=torch.long)
        for name, path in config.lora_adapters.items():
            self._load_adapter(name, path)

    def _turn_enders(self) -> set[int]:
        """EOS and the special tokens the chat template puts after an assistant's words (e.g. `<|end|>`)."""
        enders = {self.tokenizer.eos_token_id}
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "q"}, {"role": "assistant", "content": "ANSWER"}], tokenize=False)
        except Exception:  # noqa: BLE001 - no usable template: EOS alone ends a turn
            return enders
        tail = text[text.rindex("ANSWER") + len("ANSWER"):]
        return enders | (set(self.encode(tail)) & self._special_ids)

    # --- text ---------------------------------------------------------------------------------------

    def encode(self, text: str) -> Sequence[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def tokenize(self, text: str) -> list[dict]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [{"id": i, "text": text[start:stop], "start": start, "stop": stop}
                for i, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"])]

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        try:
            return self.tokenizer.apply_chat_template(template_messages(messages), tools=tools, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as exc:  # jinja raise_exception, bad roles
            raise BackendError(422, f"chat template error: {exc}", "template_error") from exc

    # --- adapters -----------------------------------------------------------------------------------

    def _load_adapter(self, name: str, path: str) -> None:
        if not (Path(path) / "adapter_config.json").is_file():
            raise BackendError(404, f"No adapter found at {path!r}: adapter_config.json is missing", "not_found")
        with self._lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, path, adapter_name=name)
                self.peft.eval()
            else:
                self.peft.load_adapter(path, adapter_name=name)
            self.adapters[name] = path

    def _unload_adapter(self, name: str) -> None:
        with self._lock:
            del self.adapters[name]
            if self.adapters:
                self.peft.delete_adapter(name)
            else:  # peft cannot run with zero adapters: strip the LoRA layers and serve the plain base again
                self.base = self.peft.unload()
                self.peft = None

    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.to_thread(self._load_adapter, name, path)

    async def unload_adapter(self, name: str) -> None:
        await asyncio.to_thread(self._unload_adapter, name)

    # --- generation ---------------------------------------------------------------------------------

    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache, adapter: str | None) -> torch.Tensor:
        with self._lock:
            model = self.peft if self.peft is not None else self.base
            adapters_off = contextlib.nullcontext()
            if adapter is None and self.peft is not None:
                adapters_off = self.peft.disable_adapter()
            elif adapter is not None and adapter in self.adapters:
                self.peft.set_adapter(adapter)
            elif adapter is not None:
                raise BackendError(424, f"adapter {adapter!r} was unloaded during generation", "generation")
            with adapters_off, torch.inference_mode():
                out = model(input_ids=input_ids, cache=cache, use_cache=True)  # the cache grows in place
                return out.logits[0, -1].float().index_fill_(0, self._never, float("-inf"))

    @staticmethod
    def _penalize(logits: torch.Tensor, params: GenerationParams, generated: list[int]) -> torch.Tensor:
        """OpenAI's presence and frequency penalties over the tokens generated so far (before temperature, greedy too)."""
        if not generated or not (params.presence_penalty or params.frequency_penalty):
            return logits
        counts = torch.bincount(torch.tensor(generated), minlength=logits.numel()).to(logits.dtype)
        return logits - (params.frequency_penalty or 0.0) * counts - (params.presence_penalty or 0.0) * (counts > 0).to(logits.dtype)

    @staticmethod
    def _choose(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None):
        if not params.sampling:
            token_id = int(logits.argmax())
            return token_id, float(torch.log_softmax(logits, -1)[token_id])
        logits = logits / (params.temperature or 1.0)
        if params.top_k:
            kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if params.top_p and params.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cumulative - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        logprobs = torch.log_softmax(logits, -1)
        token_id = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
        return token_id, float(logprobs[token_id])

    def _generate(self, prompt: Sequence[int], params: GenerationParams, adapter: str | None,
                  cancel: Cancellation, emit: Callable[[object], None]) -> None:
        generator = torch.Generator().manual_seed(params.seed) if params.sampling else None
        input_ids, cache = torch.tensor([list(prompt)]), DynamicCache(config=self.base.config)
        text_ids: list[int] = []
        generated: list[int] = []  # every token id produced, for the penalties
        text = ""
        for step in range(params.max_new_tokens):
            if cancel.is_set():
                return
            logits = self._penalize(self._forward(input_ids, cache, adapter), params, generated)
            token_id, logprob = self._choose(logits, params, generator)
            generated.append(token_id)
            special = token_id in self._special_ids
            if special:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
            else:  # decode the whole answer so multi-byte characters split across tokens come out whole
                text_ids.append(token_id)
                full = self.tokenizer.decode(text_ids)
                piece = "" if full.endswith("\ufffd") else full[len(text):]
                text += piece
            finish = None
            if token_id == self.tokenizer.eos_token_id:
                finish = "eos_token"
            elif any(stop in text[-(len(piece) + len(stop)):] for stop in params.stop):
                finish = "stop_sequence"
            elif step == params.max_new_tokens - 1:
                finish = "length"
            emit(Token(token_id, piece, logprob, special, finish))
            if finish:
                return
            input_ids = torch.tensor([[token_id]])
            if params.token_delay_s:
                cancel.wait(params.token_delay_s)

    async def stream(self, prompt: Sequence[int], params: GenerationParams, adapter: str | None,
                     cancel: Cancellation) -> AsyncIterator[list[Token]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            try:
                self._generate(prompt, params, adapter, cancel, emit)
            except BaseException as exc:  # surfaced to the request; the worker thread must not die silently
                emit(exc)
            finally:
                emit(_DONE)

        loop.run_in_executor(self._executor, work)
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            tokens = [item for item in batch if isinstance(item, Token)]
            if tokens:
                yield tokens
            for item in batch:
                if isinstance(item, BackendError):
                    raise item
                if isinstance(item, BaseException):
                    raise BackendError(424, f"generation failed: {item}", "generation") from item
            if _DONE in batch:
                return
