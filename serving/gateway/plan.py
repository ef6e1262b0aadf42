"""The pure stages of the pipeline: the request's ids, its route, and the plan of what its backend is asked.

No I/O and no server: what they need comes from the configuration snapshot, so they are unit-tested alone
(tests/serving/test_gateway_pipeline.py). Between `plan_request` and `Plan.fit` the gateway counts the prompt
(`parsing.count_prompt`: the model's tokenizer, in a thread for a long prompt).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from serving.drivers import BackendRequest
from serving.gateway.errors import ApiError
from serving.gateway.parsing import ClientRequest, build_backend_request, fit_context, reservation_tokens, resolve_max_tokens
from serving.tokencount import PromptCount

# "tgi": TGI's own placeholder; "dummy": what huggingface_hub's InferenceClient(model=<url>).chat_completion() sends.
DEFAULT_MODEL_NAMES = {None, "", "default", "tgi", "dummy"}
NOT_DEPLOYED_HINT = " A fine-tuned model answers only once it is deployed (console: Fine-tuning › Adapters)."
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,48}$")


def request_ids(given: str | None) -> tuple[str, str]:
    """(the ledger's request id, the id the answer echoes in `x-request-id`). The ledger id is unique per request
    even when a client reuses its valid x-request-id (`<id>~<12 hex>`; else a reused id would make ignore_conflicts
    drop the later requests' usage); the client's id is echoed, or the generated one."""
    echo = given if given and REQUEST_ID_RE.match(given) else None
    if echo:
        return f"{echo}~{secrets.token_hex(6)}", echo
    request_id = secrets.token_hex(12)
    return request_id, request_id


def route_for(tenant, name: str | None):
    """The tenant's route for a model name (`serving.routing.Route`); no name or a placeholder: its default model, else
    its only base model. 404 `model_not_found` otherwise."""
    if name in DEFAULT_MODEL_NAMES:
        name = tenant.default_model
        if not name:
            bases = [r for r in tenant.models.values() if r.adapter is None]
            if len(bases) != 1:
                raise ApiError(404, "No model given and no default model set: pass `model` (see GET /v1/models).",
                               param="model", code="model_not_found")
            return bases[0]
    route = tenant.models.get(name)
    if route is None:
        hint = NOT_DEPLOYED_HINT if isinstance(name, str) and name.startswith("ft:") else ""
        raise ApiError(404, f"The model `{name}` does not exist or you do not have access to it.{hint}", param="model",
                       code="model_not_found")
    return route


@dataclass(slots=True)
class Plan:
    """What the client asked for (`req`), where it goes (`route`, `pool`) and what the backend is asked."""

    req: ClientRequest
    route: object  # serving.routing.Route
    pool: object  # serving.config.PoolEntry
    backend_request: BackendRequest
    max_tokens: int
    prompt: PromptCount | None = None  # set by fit()

    def fit(self, prompt: PromptCount) -> None:
        """The counted prompt, and the max tokens that go with it (400 `context_length_exceeded` beyond the context)."""
        self.prompt = prompt
        self.max_tokens = fit_context(self.req, self.backend_request, prompt, self.pool.context_length)

    @property
    def reserve_tokens(self) -> int:
        """What admission reserves: prompt + max tokens, capped at the context for a bound."""
        return reservation_tokens(self.prompt, self.max_tokens, self.pool.context_length)


_version_counts: dict[tuple, int] = {}


def pick_version(route, tenant_id: int, pools):
    """A canary rollout's split: which version serves this request. Its route (`route.canary`) for `canary_percent` %
    of the name's requests, spread evenly (request n goes to the canary when floor((n+1)·p/100) passes floor(n·p/100):
    at 20 %, every fifth), counted per gateway process, tenant, name and canary; else the current version. A canary
    no backend of its pool holds yet does not take requests (they stay on the current version)."""
    canary = route.canary
    if canary is None or route.canary_percent <= 0:
        return route
    key = (tenant_id, route.name, canary.adapter, route.canary_percent)
    n = _version_counts.get(key, 0)
    _version_counts[key] = n + 1
    if ((n + 1) * route.canary_percent) // 100 == (n * route.canary_percent) // 100:
        return route
    pool = pools.get(canary.pool_id)
    if pool is None or (canary.model_id is None and not any(canary.adapter in b.loaded_adapters for b in pool.backends)):
        return route
    return canary


def plan_request(req: ClientRequest, tenant, pools) -> Plan:
    """Route the request and rewrite it for the backend (system prompt, max tokens, sampling, adapter, cache salt:
    `parsing.build_backend_request`). `pools`: the snapshot's, by id. A rollout's name picks its version here
    (`pick_version`); the plan's route is the version served, so the ledger's `adapter` names it."""
    route = pick_version(route_for(tenant, req.model), tenant.id, pools)
    pool = pools[route.pool_id]
    if route.adapter is not None and route.model_id is None and not any(route.adapter in b.loaded_adapters for b in pool.backends):
        raise ApiError(503, f"The model `{route.name}` is deployed but not loaded on any backend yet (loading, or "
                            "awaiting a backend restart). Try again later.", code="adapter_not_loaded", headers={"retry-after": "30"})
    max_tokens = resolve_max_tokens(req, tenant, pool.context_length)
    return Plan(req, route, pool, build_backend_request(req, tenant, route, pool, max_tokens), max_tokens)
