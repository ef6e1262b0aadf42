"""The gateway's endpoints: one value per route, computed once per request from its path.

An `Endpoint` knows its protocol (OpenAI on /v1, TGI on /generate*, POST /), whether the route fixes streaming
(TGI's two routes) or the body's `stream` decides (OpenAI's), how the protocol shapes an error (a JSON body, or an
in-band event once a stream has started), and the names its protocol gives the prompt and the max tokens (for
errors that name the parameter). `name` is what the ledger, the journal and the metrics call it.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.gateway.formatting import OpenAIFormat, TGIFormat

OPENAI = "openai"
TGI = "tgi"


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str  # chat | completions | generate | generate_stream | models | model | metrics; "generate?": TGI's POST /
    protocol: str  # OPENAI | TGI
    method: str  # the one HTTP method the route takes
    stream: bool | None = None  # fixed by the route (TGI), or None: the body's `stream` decides (OpenAI)
    inference: bool = False  # an inference route (the pipeline), not /v1/models or /metrics
    prompt_param: str = ""  # where the prompt is: messages | prompt | inputs
    compat: bool = False  # TGI's POST /: the body's `stream` picks /generate or /generate_stream

    @property
    def tgi(self) -> bool:
        return self.protocol == TGI

    @property
    def max_tokens_param(self) -> str:
        return "parameters.max_new_tokens" if self.tgi else "max_tokens"

    def resolve(self, data: dict) -> Endpoint:
        """The route that serves this body: TGI's POST / is /generate_stream when `stream` is true, else /generate."""
        if not self.compat:
            return self
        return GENERATE_STREAM if data.get("stream") is True else GENERATE

    def error_body(self, err) -> bytes:
        """An `ApiError` as this protocol's JSON body."""
        return err.tgi_body() if self.tgi else err.openai_body()

    def error_event(self, message: str, *, code: str, tgi_type: str) -> bytes:
        """An in-band error that ends a stream already started (OpenAI: type `server_error` with `code`)."""
        return TGIFormat.error_event(message, tgi_type) if self.tgi else OpenAIFormat.error_event(message, "server_error", code)


CHAT = Endpoint("chat", OPENAI, "POST", inference=True, prompt_param="messages")
COMPLETIONS = Endpoint("completions", OPENAI, "POST", inference=True, prompt_param="prompt")
GENERATE = Endpoint("generate", TGI, "POST", stream=False, inference=True, prompt_param="inputs")
GENERATE_STREAM = Endpoint("generate_stream", TGI, "POST", stream=True, inference=True, prompt_param="inputs")
TGI_COMPAT = Endpoint("generate?", TGI, "POST", inference=True, prompt_param="inputs", compat=True)
MODELS = Endpoint("models", OPENAI, "GET")
MODEL = Endpoint("model", OPENAI, "GET")
METRICS = Endpoint("metrics", OPENAI, "GET")

ROUTES = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": COMPLETIONS,
    "/v1/models": MODELS,
    "/generate": GENERATE,
    "/generate_stream": GENERATE_STREAM,
    "/metrics": METRICS,
}
MODEL_PREFIX = "/v1/models/"
BY_NAME = {e.name: e for e in (CHAT, COMPLETIONS, GENERATE, GENERATE_STREAM, TGI_COMPAT, MODELS, MODEL, METRICS)}


def endpoint_for(path: str) -> Endpoint | None:
    """The endpoint of a path (POST / is TGI's compat route), or None when the gateway does not serve it."""
    if path == "/":
        return TGI_COMPAT
    if path.startswith(MODEL_PREFIX):
        return MODEL
    return ROUTES.get(path)


def named(endpoint: Endpoint | str) -> Endpoint:
    """The endpoint itself, or the one of that name (callers that still name it by its ledger name)."""
    return BY_NAME[endpoint] if isinstance(endpoint, str) else endpoint
