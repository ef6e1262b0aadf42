"""The per-tenant output guard: redact e-mails, phone numbers, card numbers, custom patterns and blocked terms
in what the models answer, in streams as well as in whole answers (docs/gateway.md, "Output guard").

`OutputGuard` is compiled once per config snapshot (`guard_from_config`, None when the tenant enables nothing).
`guard.apply(text)` redacts a whole answer; `guard.stream()` gives a per-request `StreamRedactor` whose
`feed(chunk)` returns the text that is safe to send now and `flush()` the rest at the end. For any chunking,
`"".join(feed(c) for c in chunks) + flush() == apply("".join(chunks))` (as long as no match candidate is longer
than MAX_HOLD characters: such a candidate is cut).

The hold-back rule. Each detector is one compiled regex. From its parse tree we derive two character classes:
its *alphabet* (every character a match can consume, or examine in a lookahead wider than one character) and its
*first* set (characters a match can start with). A regex attempt at position p reads only a run of alphabet
characters from p plus the one character that ends the run, so every attempt that starts before the trailing run
of alphabet characters is already decided. Inside that trailing run, only a first-set character can start a
match. The detector's hold point is therefore the first first-set character in the trailing alphabet run (at most
MAX_HOLD characters back); the redactor emits up to the earliest hold point over all detectors. For plain prose
that is a few characters (the last word for e-mails, nothing when the text does not end in a digit for phones).
"""

from __future__ import annotations

import json
import logging
import re
import re._constants as _c
import re._parser as _p
from dataclasses import dataclass
from typing import Callable

import re2

from common.parsers import json_loads

log = logging.getLogger(__name__)

REDACTED = "[REDACTED]"
BLOCKED = "[BLOCKED]"
MAX_HOLD = 256  # the longest tail a stream holds back; a match candidate longer than this is cut
CONTEXT = 64  # characters already sent kept for lookbehinds / \b at the start of the undecided text
# Tenants' own patterns run on RE2 (linear time in the text, whatever the pattern): a backtracking engine lets one
# tenant's `(?:\S+\s?)+#` spend minutes of the event loop every gateway request shares. The built-in detectors
# are the platform's own (bounded quantifiers) and keep Python's engine for their lookarounds.
MAX_PATTERN_CHARS = 500
MAX_PATTERNS = 50
RE2_MAX_MEM = 8 << 20  # bytes of compiled program per pattern
# RE2 is linear in the text, but its factor is the size of the compiled program when the DFA runs out of memory and
# RE2 simulates the NFA: `(?:(?:\S+\s?){1,30}){1,30}#` (15,303 instructions) took 45 ms of the shared event loop per
# streamed token and 270 ms per 2,500 characters of answer (bench/noisy_neighbour.py: another tenant's p50 went from
# 20 ms to 8 s). Up to a few hundred instructions matching stays at DFA speed (≤ 0.03 ms a token, ≤ 0.02 ms per 1,000
# characters); the patterns a tenant needs (IDs, keys, account numbers) are 15-400. Counted repetitions multiply the
# size ({1,30} nested in {1,30}: 900 copies); `+` and `*` do not.
MAX_PROGRAM_SIZE = 500  # RE2 instructions of one pattern
MAX_TOTAL_PROGRAM_SIZE = 2000  # of all of a tenant's patterns together

EMAIL_RE = (
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,6}\.[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)
_PHONE_END = r"(?!\w)(?![.-]\d)"
PHONE_RE = (
    r"(?<![\w.+-])(?:"
    r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,5}\)|\d{1,5})){1,7}"  # international: +44 20 7946 0958, +1 (555) 123-4567, +4915112345678
    r"|\(\d{2,5}\)[ .-]?\d{3,4}[ .-]?\d{3,4}"  # (555) 123-4567, (030) 1234 5678
    r"|\d{3}([-. ])\d{3}\1\d{4}"  # 555-123-4567, 555.123.4567, 555 123 4567
    r"|0\d([ .])\d\d(?:\2\d\d){3}"  # 06 12 34 56 78, 01.23.45.67.89
    r"|0\d{1,4}[ -]\d{3,8}(?:[ -]\d{3,4})?"  # 020 7946 0958, 07700 900123, 030 12345678
    r"|\d{3}-\d{4}"  # 555-1234
    r")" + _PHONE_END
)
CARD_RE = r"(?<![\w.+-])\d(?:[ -]?\d){12,18}(?!\w)(?![ -]?\d)"
_DATE_RE = re.compile(r"\d{4}[-./ ]\d{1,2}[-./ ]\d{1,2}|\d{1,2}[-./ ]\d{1,2}[-./ ]\d{2,4}")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_ok(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _phone_ok(text: str) -> bool:
    digits = sum(ch.isdigit() for ch in text)
    return 7 <= digits <= 15 and not _DATE_RE.fullmatch(text)


# ---- pattern analysis: alphabet and first characters ---------------------------------------------

_CATEGORIES = {
    _c.CATEGORY_DIGIT: r"\d", _c.CATEGORY_NOT_DIGIT: r"\D", _c.CATEGORY_SPACE: r"\s",
    _c.CATEGORY_NOT_SPACE: r"\S", _c.CATEGORY_WORD: r"\w", _c.CATEGORY_NOT_WORD: r"\W",
}


class _Chars:
    """A set of characters as the text of a regex character class (or everything)."""

    def __init__(self):
        self.items: set[str] = set()
        self.all = False

    def add_items(self, op, av) -> None:
        if op is _c.LITERAL:
            self.items.add(re.escape(chr(av)))
        elif op is _c.IN:
            for iop, iav in av:
                if iop is _c.LITERAL:
                    self.items.add(re.escape(chr(iav)))
                elif iop is _c.RANGE:
                    self.items.add(f"{re.escape(chr(iav[0]))}-{re.escape(chr(iav[1]))}")
                elif iop is _c.CATEGORY and iav in _CATEGORIES:
                    self.items.add(_CATEGORIES[iav])
                else:  # NEGATE and anything unusual: be conservative
                    self.all = True
        else:  # ANY, NOT_LITERAL, unknown
            self.all = True

    def merge(self, other: "_Chars") -> None:
        self.items |= other.items
        self.all = self.all or other.all

    def compile(self, flags: int) -> re.Pattern:
        if self.all or not self.items:
            return re.compile(r"[\s\S]" if self.all else r"(?!)")
        return re.compile("[" + "".join(sorted(self.items)) + "]", flags)


_CONSUMING = (_c.LITERAL, _c.NOT_LITERAL, _c.IN, _c.ANY)


def _one_char(op, av) -> str | None:
    """A regex matching exactly what one consuming item matches, or None when unsure."""
    if op is _c.LITERAL:
        return re.escape(chr(av))
    if op is _c.NOT_LITERAL:
        return "[^" + re.escape(chr(av)) + "]"
    if op is _c.ANY:
        return r"[\s\S]"  # a superset without DOTALL: fine for a necessary condition
    if op is _c.IN:
        negate, parts = False, []
        for iop, iav in av:
            if iop is _c.NEGATE:
                negate = True
            elif iop is _c.LITERAL:
                parts.append(re.escape(chr(iav)))
            elif iop is _c.RANGE:
                parts.append(f"{re.escape(chr(iav[0]))}-{re.escape(chr(iav[1]))}")
            elif iop is _c.CATEGORY and iav in _CATEGORIES:
                parts.append(_CATEGORIES[iav])
            else:
                return None
        return ("[^" if negate else "[") + "".join(parts) + "]" if parts else None
    return None
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT))


class _Analysis:
    def __init__(self):
        self.ignorecase = False

    def alphabet(self, items, out: _Chars) -> None:
        for op, av in items:
            if op in _CONSUMING:
                out.add_items(op, av)
            elif op is _c.SUBPATTERN:
                if av[1] & _c.SRE_FLAG_IGNORECASE:
                    self.ignorecase = True
                self.alphabet(av[3], out)
            elif op is _c.ATOMIC_GROUP:
                self.alphabet(av, out)
            elif op in _REPEATS:
                self.alphabet(av[2], out)
            elif op is _c.BRANCH:
                for alt in av[1]:
                    self.alphabet(alt, out)
            elif op is _c.GROUPREF_EXISTS:
                self.alphabet(av[1], out)
                if av[2] is not None:
                    self.alphabet(av[2], out)
            elif op in (_c.ASSERT, _c.ASSERT_NOT):
                # A lookahead reading at most one character reads the run's end at worst; wider ones count.
                # Lookbehinds read text before the position (kept as context).
                if av[0] == 1 and av[1].getwidth()[1] > 1:
                    self.alphabet(av[1], out)
            elif op is _c.AT and av is _c.AT_END:
                out.items.add(r"\n")  # `$` also matches before a final newline
            # AT, GROUPREF: nothing consumed beyond what the groups consume

    def prefix(self, items) -> list[str]:
        """Class texts of the single characters every match starts with (leading zero-width items skipped)."""
        out: list[str] = []
        for op, av in items:
            if op in (_c.AT, _c.ASSERT, _c.ASSERT_NOT):
                continue
            if op in _REPEATS and av[0] >= 1 and len(av[2].data) == 1 and av[2].data[0][0] in _CONSUMING:
                one = _one_char(*av[2].data[0])
                if one is not None:
                    out.extend([one] * min(av[0], 8))
                break
            one = _one_char(op, av) if op in _CONSUMING else None
            if one is None:
                break
            out.append(one)
            if len(out) >= 32:
                break
        return out

    def first(self, items, out: _Chars) -> bool:
        """Add the characters a match of `items` can start with; True when `items` can match empty."""
        for op, av in items:
            if op in _CONSUMING:
                out.add_items(op, av)
                return False
            if op is _c.SUBPATTERN:
                nullable = self.first(av[3], out)
            elif op is _c.ATOMIC_GROUP:
                nullable = self.first(av, out)
            elif op in _REPEATS:
                nullable = self.first(av[2], out) or av[0] == 0
            elif op is _c.BRANCH:
                nullable = False
                for alt in av[1]:
                    nullable = self.first(alt, out) or nullable
            elif op is _c.GROUPREF_EXISTS:
                nullable = self.first(av[1], out)
                nullable = (self.first(av[2], out) if av[2] is not None else True) or nullable
            elif op in (_c.ASSERT, _c.ASSERT_NOT, _c.AT):
                nullable = True
            else:  # GROUPREF and anything unknown
                out.all = True
                return True
            if not nullable:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Detector:
    name: str
    regex: object  # re.Pattern (built-in detectors) or an RE2 regexp (tenants' patterns): search/finditer alike
    replacement: str
    alphabet_rev: re.Pattern  # matches the trailing alphabet run of the reversed tail
    first: re.Pattern  # matches where a match could start (its leading characters, possibly cut by the end)
    valid: Callable[[str], bool] | None = None


def _re2(pattern: str):
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False
    return re2.compile(pattern, options)


def custom_pattern_error(pattern: str) -> str | None:
    """Why a tenant's redaction pattern cannot be used (None: it can). Patterns are RE2 syntax, matched in linear
    time: no lookarounds or backreferences; `\\d`, `\\w`, `\\s` and `\\b` are ASCII."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"it is {len(pattern)} characters long; the limit is {MAX_PATTERN_CHARS}"
    try:
        size = _re2(pattern).programsize
    except re2.error as exc:
        reason = str(exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc)
        if "invalid perl operator" in reason or "invalid escape sequence" in reason:
            return f"{reason} (lookarounds and backreferences are not supported: patterns run on RE2, in linear time)"
        return reason
    if size > MAX_PROGRAM_SIZE:
        return (f"it compiles to {size:,} RE2 instructions; the limit is {MAX_PROGRAM_SIZE:,} (counted repetitions such as "
                "{1,30}, nested or large, multiply the size and make matching slow: use + or * or smaller counts)")
    try:
        make_detector("check", pattern, REDACTED)
    except (re.error, ValueError, re2.error) as exc:
        return str(exc)
    return None


def patterns_total_error(patterns) -> str | None:
    """Why a tenant's patterns together cannot be used (each one checked by `custom_pattern_error` first)."""
    total = sum(_re2(p).programsize for p in patterns)
    if total > MAX_TOTAL_PROGRAM_SIZE:
        return (f"together they compile to {total:,} RE2 instructions; the limit is {MAX_TOTAL_PROGRAM_SIZE:,} (every pattern "
                "is matched against every answer: remove some, or use + or * instead of counted repetitions)")
    return None


def make_detector(name: str, pattern: str | re.Pattern, replacement: str, valid=None, *, linear: bool = True) -> Detector:
    """Compile a detector (raises re.error / re2.error / ValueError for a bad or empty-matching pattern).

    `linear`: match with RE2 (tenants' patterns). The hold-back analysis reads Python's parse of the same pattern;
    for the syntax both engines accept they match the same strings (RE2's ASCII classes are subsets of Python's
    Unicode ones, so the derived alphabet is a safe superset)."""
    regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
    parsed = _p.parse(regex.pattern, regex.flags)
    if parsed.getwidth()[0] == 0:
        raise ValueError("the pattern can match the empty string")
    analysis = _Analysis()
    alphabet, first = _Chars(), _Chars()
    analysis.alphabet(parsed.data, alphabet)
    if analysis.first(parsed.data, first):
        first.all = True
    flags = regex.flags & (re.IGNORECASE | re.ASCII)
    if analysis.ignorecase:
        flags |= re.IGNORECASE
    alpha = alphabet.compile(flags)
    alphabet_rev = re.compile(f"(?:{alpha.pattern})*", alpha.flags)
    # Where a match could start: its leading characters, complete or cut by the end of the text
    # (`c1(?:c2(?:c3|\Z)|\Z)`); else one character of its first set.
    prefix = analysis.prefix(parsed.data)
    if prefix:
        start = prefix[-1]
        for one in reversed(prefix[:-1]):
            start = f"{one}(?:{start}|\\Z)"
        starts = re.compile(start, flags)
    else:
        starts = first.compile(flags)
    if linear:
        regex = _re2(regex.pattern)
    return Detector(name, regex, replacement, alphabet_rev, starts, valid)


# ---- the guard -----------------------------------------------------------------------------------


class OutputGuard:
    """A tenant's compiled detectors. Immutable; shared by all of the tenant's requests."""

    def __init__(self, detectors: list[Detector]):
        self.detectors = tuple(detectors)

    def __repr__(self) -> str:
        return f"OutputGuard({', '.join(d.name for d in self.detectors)})"

    def apply(self, text: str) -> str:
        """The whole text, redacted."""
        if not text:
            return text
        r = StreamRedactor(self)
        return r.feed(text) + r.flush()

    def stream(self) -> "StreamRedactor":
        return StreamRedactor(self)

    def apply_json(self, text: str) -> str:
        """Tool-call arguments: JSON text whose strings (keys and values) are redacted one by one and which is
        then written again, so valid JSON stays valid JSON (a match never spans quotes or brackets). Unchanged
        text is returned as it is; text that is not JSON (a model may write anything) is redacted as plain text."""
        try:
            value = json_loads(text)  # a model's arguments may nest deeper than json.loads (or `walk`) can recurse
        except ValueError:
            return self.apply(text)
        changed = False

        def walk(v):
            nonlocal changed
            if isinstance(v, str):
                out = self.apply(v)
                changed = changed or out != v
                return out
            if isinstance(v, list):
                return [walk(x) for x in v]
            if isinstance(v, dict):
                return {walk(k): walk(x) for k, x in v.items()}
            return v

        value = walk(value)
        return json.dumps(value, ensure_ascii=False) if changed else text

    def redact_tokens(self, tokens: list[dict]) -> None:
        """Redact TGI `details.tokens` texts in place, so their concatenation equals `apply()` of the text.

        Special tokens are left alone; text still held at the end goes to the last non-special token.
        """
        r = self.stream()
        last = None
        for tok in tokens:
            if tok.get("special"):
                continue
            tok["text"] = r.feed(tok.get("text", ""))
            last = tok
        rest = r.flush()
        if rest and last is not None:
            last["text"] += rest


class StreamRedactor:
    """Per-request incremental redaction. `feed(chunk) -> str` safe text now, `flush() -> str` the rest."""

    __slots__ = ("guard", "buf", "pos", "resume", "emitted")

    def __init__(self, guard: OutputGuard):
        self.guard = guard
        self.buf = ""  # kept context + undecided text
        self.pos = 0  # buf[:pos] has been emitted (kept as context only)
        self.resume = [0] * len(guard.detectors)  # per detector: where its scan continues (index in buf)
        self.emitted = 0

    @property
    def held(self) -> int:
        """Characters received but not yet emitted."""
        return len(self.buf) - self.pos

    def feed(self, text: str) -> str:
        if not text:
            return ""
        self.buf += text
        return self._step(final=False)

    def flush(self) -> str:
        return self._step(final=True)

    def _step(self, *, final: bool) -> str:
        buf, pos = self.buf, self.pos
        n = len(buf)
        detectors = self.guard.detectors
        found = []  # (start, -length, detector index, end)
        holds = []
        cut = n
        for i, d in enumerate(detectors):
            start = self.resume[i]
            if final:
                hold = n
            else:
                lo = max(start, n - MAX_HOLD)
                run = d.alphabet_rev.match(buf[lo:][::-1]).end()
                m = d.first.search(buf, n - run)
                hold = m.start() if m else n
            holds.append(hold)
            if hold < cut:
                cut = hold
            for m in d.regex.finditer(buf, start):
                s = m.start()
                if s >= hold:
                    break
                e = m.end()
                if e == s:
                    continue
                found.append((s, s - e, i, e))
        if not final and cut < n - MAX_HOLD:
            cut = n - MAX_HOLD
        # Leftmost match wins, then the longest, then the detector's rank; overlapping ones are dropped.
        found.sort()
        chosen = []
        last_end = pos
        for s, _neg, i, e in found:
            if s >= cut:
                break
            if s < last_end:
                continue
            d = detectors[i]
            if d.valid is not None and not d.valid(buf[s:e]):
                continue
            chosen.append((s, e, i))
            last_end = e
        if chosen and chosen[-1][1] > cut:
            s, e, _ = chosen[-1]
            if s >= n - MAX_HOLD:
                cut = s
                chosen.pop()
            else:
                cut = e  # keep the hold bounded: send the whole (final) match now
        # Each detector continues after its last match that starts before the cut (as finditer would).
        for s, _neg, i, e in found:
            if s < cut and e > self.resume[i]:
                self.resume[i] = e
        pieces = []
        at = pos
        for s, e, i in chosen:
            pieces.append(buf[at:s])
            pieces.append(detectors[i].replacement)
            at = e
        pieces.append(buf[at:cut])
        out = "".join(pieces)
        # Keep CONTEXT characters before the cut for lookbehinds and \b.
        drop = max(0, cut - CONTEXT)
        if drop:
            self.buf = buf[drop:]
            self.resume = [max(r, cut) - drop for r in self.resume]
        else:
            self.resume = [max(r, cut) for r in self.resume]
        self.pos = cut - drop
        self.emitted += len(out)
        return out


# ---- from the tenant's settings ------------------------------------------------------------------

_BUILTINS: dict[str, Detector] = {}


def _builtin(name: str) -> Detector:
    if not _BUILTINS:
        _BUILTINS["email"] = make_detector("email", EMAIL_RE, REDACTED, linear=False)
        _BUILTINS["card"] = make_detector("card", CARD_RE, REDACTED, _card_ok, linear=False)
        _BUILTINS["phone"] = make_detector("phone", PHONE_RE, REDACTED, _phone_ok, linear=False)
    return _BUILTINS[name]


def blocked_terms_pattern(terms) -> str | None:
    """`(?i)` whole-word alternation, longest first; None when no term is usable."""
    cleaned = sorted({t.strip() for t in terms if isinstance(t, str) and t.strip()}, key=lambda t: (-len(t), t))
    if not cleaned:
        return None
    return r"(?i)(?<!\w)(?:" + "|".join(re.escape(t) for t in cleaned) + r")(?!\w)"


def build_guard(*, emails: bool = False, phones: bool = False, cards: bool = False, patterns=(), blocked_terms=(),
                label: str = "") -> OutputGuard | None:
    """Compile a guard; None when nothing is enabled. A bad custom pattern is skipped with a warning."""
    detectors = []
    if emails:
        detectors.append(_builtin("email"))
    if cards:
        detectors.append(_builtin("card"))
    if phones:
        detectors.append(_builtin("phone"))
    total = 0
    for n, pattern in enumerate(list(patterns or ())[:MAX_PATTERNS]):
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_PATTERN_CHARS:
            continue
        try:
            detector = make_detector(f"pattern{n}", pattern, REDACTED)
            size = detector.regex.programsize
            if size > MAX_PROGRAM_SIZE or total + size > MAX_TOTAL_PROGRAM_SIZE:  # saved before the limits
                raise ValueError(f"{size:,} RE2 instructions (limits: {MAX_PROGRAM_SIZE:,} a pattern, {MAX_TOTAL_PROGRAM_SIZE:,} "
                                 f"together; {total:,} used by the patterns before it)")
            total += size
            detectors.append(detector)
        except Exception as exc:  # never let one tenant's pattern break the snapshot
            log.warning("output guard%s: custom pattern %r skipped: %s", f" ({label})" if label else "", pattern, exc)
    blocked = blocked_terms_pattern(blocked_terms or ())
    if blocked is not None:
        try:
            detectors.append(make_detector("blocked", blocked, BLOCKED, linear=False))
        except Exception as exc:
            log.warning("output guard%s: blocked terms skipped: %s", f" ({label})" if label else "", exc)
    return OutputGuard(detectors) if detectors else None


def guard_from_config(cfg, label: str = "") -> OutputGuard | None:
    """The guard for a `serving.models.ModelConfig` (or None: no config, or nothing enabled)."""
    if cfg is None:
        return None
    return build_guard(
        emails=bool(getattr(cfg, "redact_emails", False)),
        phones=bool(getattr(cfg, "redact_phone_numbers", False)),
        cards=bool(getattr(cfg, "redact_card_numbers", False)),
        patterns=getattr(cfg, "redact_patterns", None) or (),
        blocked_terms=getattr(cfg, "blocked_terms", None) or (),
        label=label,
    )
