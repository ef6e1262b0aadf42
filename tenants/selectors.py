"""Reads on tenants. Everything that finds a tenant for a user or a key goes through here."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from django.core.cache import cache
from django.db.models import Sum
from django.http import Http404

from tenants.models import Membership, PlatformSettings, Policy, Role, SystemPromptVersion, Tenant


def memberships_for_user(user) -> list[Membership]:
    """The tenants a user belongs to, for the tenant switcher."""
    if not user.is_authenticated:
        return []
    return list(Membership.all_tenants.filter(user=user).select_related("tenant").order_by("tenant__name"))


def membership_for_user(user, tenant_slug: str) -> Membership:
    """The user's membership in the tenant named in the URL; 404 when there is none (ids cannot be probed)."""
    if not user.is_authenticated:
        raise Http404("No such tenant.")
    membership = Membership.all_tenants.select_related("tenant").filter(user=user, tenant__slug=tenant_slug).first()
    if membership is None:
        raise Http404("No such tenant.")
    return membership


def is_last_owner(membership: Membership) -> bool:
    """The tenant's only owner: they cannot leave or be demoted until someone else is owner (services enforce it)."""
    return membership.role == Role.OWNER and not (
        Membership.objects.for_tenant(membership.tenant_id).filter(role=Role.OWNER).exclude(pk=membership.pk).exists()
    )


def effective_quota_tokens(policy: Policy) -> int:
    """Tokens per window in force: the fixed quota, or in fair-share mode Q_i = R_total · w_i / Σ_j w_j.

    Σ runs over active fair-share tenants; integer division rounds down. 0 means unlimited.
    """
    if not policy.fair_share:
        return policy.quota_tokens
    total = PlatformSettings.load().fair_share_total_tokens
    weight_sum = fair_share_weight_sum()
    if total == 0 or weight_sum == 0:
        return 0
    return total * policy.weight // weight_sum


def fair_share_weight_sum() -> int:
    """Σ w_j over active fair-share tenants (all_tenants: the sum spans tenants by definition)."""
    return Policy.all_tenants.filter(fair_share=True, tenant__status=Tenant.Status.ACTIVE).aggregate(s=Sum("weight"))["s"] or 0


# Lines of the changed middle, old × new, past which the middle is shown as removed then added. difflib's matcher is
# superlinear when many lines repeat just under its junk threshold (1 % of the lines): two 20,000-character versions
# of 2-character lines took 5 s of CPU per GET (bench/noisy_neighbour.py); at 1,000 × 1,000 lines it takes ≤ 20 ms.
DIFF_MAX_LINE_PAIRS = 1_000_000


def prompt_diff(old: SystemPromptVersion, new: SystemPromptVersion) -> list[tuple[str, str]]:
    """Line diff between two versions as (kind, line) pairs, kind in {' ', '-', '+'}.

    Lines only, with difflib's junk heuristic: `ndiff` also compared characters within changed lines, quadratic in
    their length (35 s of CPU for two 8,000-character one-line prompts, for any viewer to request). The common
    first and last lines are taken off first; a middle of more than DIFF_MAX_LINE_PAIRS line pairs is not matched."""
    a, b = old.text.splitlines(), new.text.splitlines()
    head = 0
    while head < len(a) and head < len(b) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < len(a) - head and tail < len(b) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    mid_a, mid_b = a[head:len(a) - tail], b[head:len(b) - tail]
    out: list[tuple[str, str]] = [(" ", line) for line in a[:head]]
    if len(mid_a) * len(mid_b) > DIFF_MAX_LINE_PAIRS:
        opcodes = [("replace", 0, len(mid_a), 0, len(mid_b))]
    else:
        opcodes = difflib.SequenceMatcher(None, mid_a, mid_b).get_opcodes()
    for op, i1, i2, j1, j2 in opcodes:
        if op == "equal":
            out += [(" ", line) for line in mid_a[i1:i2]]
            continue
        out += [("-", line) for line in mid_a[i1:i2]]
        out += [("+", line) for line in mid_b[j1:j2]]
    out += [(" ", line) for line in a[len(a) - tail:]]
    return out


# A diff shows at most this many lines (the rest are counted, not sent): a 20,000-character version can have 20,000
# lines, and rendering 13,000 of them took longer than the diff itself (bench/noisy_neighbour.py, `diff`).
DIFF_MAX_LINES = 2_000
DIFF_CACHE_SECONDS = 24 * 3600


@dataclass(frozen=True)
class PromptDiff:
    """The line diff of two versions, for display: the first DIFF_MAX_LINES (kind, line) pairs, how many further ones
    were left out, and the added / removed counts of the whole diff."""

    lines: list[tuple[str, str]]
    omitted: int
    added: int
    removed: int


def prompt_diff_shown(old: SystemPromptVersion, new: SystemPromptVersion) -> PromptDiff:
    """prompt_diff(old, new), bounded to DIFF_MAX_LINES lines and cached by the version pair (versions are immutable:
    a pair's diff never changes), so asking again costs a cache read. Both versions are the caller's tenant's."""
    key = f"prompt-diff:v1:{old.tenant_id}:{old.pk}:{new.pk}"
    shown = cache.get(key)
    if shown is None:
        lines = prompt_diff(old, new)
        shown = PromptDiff(lines=lines[:DIFF_MAX_LINES], omitted=max(0, len(lines) - DIFF_MAX_LINES),
                           added=sum(1 for kind, _ in lines if kind == "+"),
                           removed=sum(1 for kind, _ in lines if kind == "-"))
        cache.set(key, shown, timeout=DIFF_CACHE_SECONDS)
    return shown


def role_choices_for(membership: Membership) -> list[str]:
    """Roles this member may grant: owners grant any role, admins any but owner."""
    if membership.role == Role.OWNER:
        return list(Role.values)
    return [Role.ADMIN, Role.DEVELOPER, Role.VIEWER]
