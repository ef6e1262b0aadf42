"""Types shared by the routes and the engines, and the validation rules TGI applies to every request."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol, Sequence


class BackendError(Exception):
    """A request failure; each route family renders it in its own body shape."""

    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


def validation_error(message: str) -> BackendError:
    return BackendError(422, message, "validation")


@dataclass
class GenerationParams:
    max_new_tokens: int
    requested_max_new_tokens: int | None = None  # what the client asked for; the simulator sizes its answer on it
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # Additive, over the tokens generated so far (OpenAI's and vLLM's definition):
    # logit[t] -= frequency_penalty · count(t) + presence_penalty · (count(t) > 0)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    token_delay_s: float = 0.0  # fault injection: a slow backend

    @property
    def sampling(self) -> bool:
        """TGI samples as soon as any warper is set, even with do_sample false."""
        return (self.do_sample or self.temperature not in (None, 1.0) or bool(self.top_k)
                or self.top_p not in (None, 1.0))


@dataclass
class Token:
    id: int
    text: str
    logprob: float
    special: bool
    finish_reason: str | None = None  # set on the last token: length | eos_token | stop_sequence

    def as_tgi(self) -> dict:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


class Cancellation:
    """Tells a generation to stop: set when the request ends early, or seen through the closed connection.

    Engines check it between tokens from their worker thread.
    """

    def __init__(self, connection_closed: Callable[[], bool] = lambda: False):
        self._event = threading.Event()
        self._connection_closed = connection_closed

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set() or self._connection_closed()

    def wait(self, timeout: float) -> None:
        self._event.wait(timeout)


class Engine(Protocol):
    """What the routes need from a model; `ModelEngine` runs a real one, `SimEngine` fakes it cheaply."""

    model_id: str
    compute_type: str
    adapters: dict[str, str]  # name -> path

    def encode(self, text: str) -> Sequence[int]: ...
    def tokenize(self, text: str) -> list[dict]: ...
    def render_chat(self, messages: list[dict]) -> str: ...
    async def load_adapter(self, name: str, path: str) -> None: ...
    async def unload_adapter(self, name: str) -> None: ...

    def stream(self, prompt: Sequence[int], params: GenerationParams, adapter: str | None,
               cancel: Cancellation) -> AsyncIterator[list[Token]]:
        """Batches of tokens as they are produced; the last token carries the finish reason."""


def finalize_params(params: GenerationParams, input_length: int, max_input_tokens: int,
                    max_total_tokens: int, max_stop_sequences: int = 4) -> GenerationParams:
    """TGI's router checks: fill the default max_new_tokens and the seed, refuse what cannot run."""
    if input_length == 0:
        raise validation_error("`inputs` cannot be empty")
    if params.temperature is not None and params.temperature <= 0:
        raise validation_error("`temperature` must be strictly positive")
    if params.top_p is not None and not 0 < params.top_p < 1:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if params.top_k is not None and params.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(params, name)
        if value is not None and not -2 <= value <= 2:
            raise validation_error(f"`{name}` must be >= -2.0 and <= 2.0")
    if len(params.stop) > max_stop_sequences:
        raise validation_error(f"`stop` supports up to {max_stop_sequences} stop sequences. Given: {len(params.stop)}")
    if input_length > max_input_tokens:
        raise validation_error(f"`inputs` tokens must be <= {max_input_tokens}. Given: {input_length}")
    if params.requested_max_new_tokens is None:
        params.max_new_tokens = max_total_tokens - input_length
    elif params.requested_max_new_tokens <= 0:
        raise validation_error("`max_new_tokens` must be strictly positive")
    else:
        params.max_new_tokens = params.requested_max_new_tokens
    if input_length + params.max_new_tokens > max_total_tokens:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`")
    if params.sampling and params.seed is None:
        params.seed = random.getrandbits(63)
    return params
