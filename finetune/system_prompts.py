"""The system prompt a fine-tuning job trains with and an evaluation scores with: by default the tenant's live one.

The gateway puts the tenant's active system prompt in front of every chat request (common.chat.inject_system_prompt
with the tenant's ModelConfig.system_message_rule). A job trained without it learns a conversation the served model
never sees (a DPO sign-off taught directly showed in 12/12 answers, served through the gateway in 0/12). So a job
records at creation which prompt it trains with (`snapshot`, kept on the row: finetune.models.SystemPromptSnapshot)
and the trainers render every example with it (finetune.templating.with_system_prompt); `skew` tells the console
when the tenant's live prompt is no longer the one an adapter was trained with.

The platform extension on the create requests, `system_prompt`: "tenant" (default: the active version), "none" (no
system prompt, as before) or a version number of the tenant's saved prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from finetune.errors import FinetuneError
from finetune.models import FineTuneJob, SystemPromptSnapshot
from serving.models import Adapter, ModelConfig
from tenants.models import SystemPromptVersion, Tenant

TENANT, NONE = "tenant", "none"
BYTES_PER_TOKEN = 4  # the platform's size estimate (finetune.selectors.estimated_token_counts): nothing is tokenized in a request


def _rule(tenant: Tenant) -> str:
    config = ModelConfig.objects.for_tenant(tenant).first()
    return config.system_message_rule if config is not None else ModelConfig._meta.get_field("system_message_rule").default


def live_version(tenant: Tenant) -> SystemPromptVersion | None:
    """The tenant's active prompt version as the gateway serves it now (read fresh, and only among its own versions)."""
    active_id = Tenant.objects.filter(pk=tenant.pk).values_list("active_prompt_id", flat=True).first()
    if active_id is None:
        return None
    return SystemPromptVersion.objects.for_tenant(tenant).filter(pk=active_id).first()


def snapshot(tenant: Tenant, choice=None, *, param: str = "system_prompt") -> dict:
    """The SystemPromptSnapshot fields for a new job or evaluation of `tenant`: {"system_prompt_version",
    "system_prompt", "system_message_rule"}. `choice`: None or "tenant" (the active version, what the gateway serves),
    "none", or the number of one of the tenant's saved versions; anything else is a 400 `invalid_system_prompt`."""
    if choice is None or choice == TENANT:
        version = live_version(tenant)
    elif choice == NONE:
        version = None
    elif isinstance(choice, int) and not isinstance(choice, bool):
        version = SystemPromptVersion.objects.for_tenant(tenant).filter(version=choice).first()
        if version is None:
            raise FinetuneError(f"{param} {choice} is not one of this account's saved system prompt versions; use "
                                "\"tenant\" (the active one), \"none\", or a version listed on the console's System "
                                "prompt page.", param=param, code="invalid_system_prompt")
    else:
        raise FinetuneError(f"{param} must be \"tenant\" (train with the system prompt the gateway serves, the "
                            f"default), \"none\" or a saved version number, got {choice!r}", param=param,
                            code="invalid_system_prompt")
    text = version.text.strip() if version is not None else ""
    return {"system_prompt_version": version.version if text else None, "system_prompt": text,
            "system_message_rule": _rule(tenant)}


def estimated_tokens(text: str) -> int:
    """Tokens the prompt adds to each rendered conversation, estimated from its size (the estimate before a job runs;
    the billed trained tokens are counted by the trainer on the conversations as rendered)."""
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN) if text else 0


@dataclass(frozen=True)
class Skew:
    """The tenant serves another system prompt than the one an adapter was trained with."""

    trained: str  # "system prompt version 3 (keep)", "no system prompt"
    served: str
    message: str


def _describe(version: int | None, text: str, rule: str) -> str:
    if not text:
        return "no system prompt"
    return f"system prompt version {version} ({rule})" if version is not None else f"a system prompt ({rule})"


def skew(tenant: Tenant, job: SystemPromptSnapshot | None, now: dict | None = None) -> Skew | None:
    """None when `job` (the adapter's training job) trained with what the tenant serves now, or is unknown (an uploaded
    adapter); else what differs and what to do. `now`: snapshot(tenant), when the caller checks several jobs."""
    if job is None:
        return None
    now = now or snapshot(tenant)
    trained = (job.system_prompt, job.system_message_rule if job.system_prompt else "")
    served = (now["system_prompt"], now["system_message_rule"] if now["system_prompt"] else "")
    if trained == served:
        return None
    was = _describe(job.system_prompt_version, *trained)
    is_ = _describe(now["system_prompt_version"], *served)
    return Skew(was, is_, f"This adapter was trained with {was}, but the gateway now serves it with {is_}: what it "
                          "learnt may not show. Train it again (a new job uses the live prompt), or make the version it "
                          "was trained with active again on the System prompt page.")


def job_for_adapter(tenant: Tenant, adapter: Adapter) -> FineTuneJob | None:
    """The fine-tuning job that trained `adapter` (None for an uploaded one)."""
    return FineTuneJob.objects.for_tenant(tenant).filter(adapter=adapter).first()
