"""JSON from outside, read one way everywhere: depth-bounded and valid Unicode.

`json_loads` is what the inference gateway (serving/gateway/parsing.py), its backend drivers
(serving/drivers/base.py) and DRF's endpoints (`JSONParser` below, REST_FRAMEWORK's DEFAULT_PARSER_CLASSES) use
instead of `json.loads`. It refuses, with a message that says what to change:

- nesting deeper than MAX_JSON_DEPTH arrays and objects inside each other. Python's decoder recurses once per
  level and fails with a RecursionError (a 500) somewhere near 1,000, less on a deep stack; OpenAI's request
  shapes need fewer than 10, a JSON Schema in `tools` a few dozen. A cheap scan of the brackets outside strings
  decides before the decoder runs, so `[` * 1,000,000 costs what reading it costs.
- a lone UTF-16 surrogate (`"\\ud800"` escaped, or raw in the bytes): Python decodes it to a str that cannot be
  encoded as UTF-8, so it fails later, far from the input (a tokenizer, the database, a backend: 500s and 502s).
  A valid pair (`"\\ud83d\\ude00"`, 😀) is one character once decoded and passes.
"""

from __future__ import annotations

import codecs
import json
import re

from rest_framework import exceptions, parsers
from rest_framework.settings import api_settings
from rest_framework.utils.json import strict_constant

MAX_JSON_DEPTH = 64  # arrays and objects inside each other: `{"messages": [{"content": "x"}]}` is 3

_KEEP = b'"[]{}'  # all the scan needs of a JSON text (UTF-8: no other character has these bytes)
_DROP = bytes(b for b in range(256) if b not in _KEEP)
_ONE_KIND = bytes.maketrans(b"{}", b"[]")  # depth does not depend on which bracket
_RUNS = re.compile(rb"\[+|\]+")
_EXACT_AFTER = 8  # innermost-pair passes (C speed) before the remaining runs are counted one by one
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # also the halves of a valid pair: then the values are checked
_RAW_SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # UTF-8 of U+D800-DFFF (json.loads decodes bytes "surrogatepass")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # in a decoded str a valid pair is one character: what is left is lone


class JsonRefused(ValueError):
    """JSON that `json.loads` would read but the platform refuses. `code`: `json_too_deep` or `invalid_unicode`;
    `path`: where the lone surrogate is (keys and list indexes from the top; `in_key`: in a key of that object)."""

    def __init__(self, message: str, *, code: str, path: tuple = (), in_key: bool = False):
        super().__init__(message)
        self.message = message
        self.code = code
        self.path = path
        self.in_key = in_key

    @property
    def param(self) -> str | None:
        """The path as OpenAI names parameters (`messages[0].content`), or None for the body itself."""
        return json_path(self.path) or None


def json_path(path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def too_deep(limit: int = MAX_JSON_DEPTH, what: str = "The JSON body") -> JsonRefused:
    return JsonRefused(f"{what} is nested deeper than {limit} levels (arrays and objects inside each other); no request "
                       f"this API takes needs that many: send it flatter.", code="json_too_deep")


def json_depth_exceeds(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the UTF-8 JSON text nests arrays and objects deeper than `limit` (brackets in strings do not count).

    Exact for valid JSON; for invalid JSON, True whenever the decoder could go deeper than `limit` before it meets the
    error. Linear, mostly in C: 1 MB of brackets takes a few ms, 40 ms at worst (1 MB of chains 64 deep), which is
    less than `json.loads` of the same text."""
    if data.count(b"[") + data.count(b"{") <= limit:  # nearly every body: nothing to scan
        return False
    # Escaped backslashes, then escaped quotes, out; then all but quotes and brackets; then what is between quotes
    # (an unterminated string hides the rest: the decoder stops there too).
    s = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(_ONE_KIND, _DROP)
    if b'"' in s:
        s = b"".join(s.split(b'"')[::2])
    if s.count(b"[") <= limit:
        return False
    if b"[" * (limit + 1) in s:
        return True
    # Each pass removes every innermost pair: one level of every subtree.
    levels = 0
    while s and levels < _EXACT_AFTER:
        reduced = s.replace(b"[]", b"")
        if len(reduced) == len(s):
            break
        s, levels = reduced, levels + 1
    if not s:
        return levels > limit
    depth = 0
    for run in _RUNS.finditer(s):
        n = run.end() - run.start()
        if s[run.start()] == 0x5B:  # [
            depth += n
            if depth + levels > limit:
                return True
        else:
            depth -= n
            if depth < 0:  # more closes than opens: the decoder fails here
                return False
    return False


def lone_surrogate(value, path: tuple = ()) -> tuple[tuple, str, bool] | None:
    """(path, the surrogate, in a key) of the first string in `value` with a lone surrogate, else None."""
    if isinstance(value, str):
        match = _LONE_SURROGATE.search(value)
        return (path, match.group(), False) if match else None
    if isinstance(value, dict):
        for key, item in value.items():
            match = _LONE_SURROGATE.search(key)
            if match:
                return path, match.group(), True
            found = lone_surrogate(item, (*path, key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = lone_surrogate(item, (*path, i))
            if found:
                return found
    return None


def surrogate_refused(path: tuple, surrogate: str, in_key: bool) -> JsonRefused:
    where = json_path(path)
    subject = (f"A key in `{where}`" if where else "A key of the body") if in_key else (f"`{where}`" if where else "The body")
    return JsonRefused(f"{subject} contains a lone UTF-16 surrogate (\\u{ord(surrogate):04x}), which is not valid Unicode: "
                       "send valid Unicode. A character beyond U+FFFF, such as an emoji, is escaped as a pair "
                       "(\\ud83d\\ude00 is 😀), never half of one.", code="invalid_unicode", path=path, in_key=in_key)


def json_loads(raw: bytes | str, *, max_depth: int = MAX_JSON_DEPTH, parse_constant=None):
    """`json.loads`, refusing (JsonRefused) nesting deeper than `max_depth` and lone surrogates. Invalid JSON, or bytes
    that are not UTF-8/16/32, raise ValueError as `json.loads` does (JsonRefused is a ValueError too)."""
    if isinstance(raw, str):
        data = raw.encode("utf-8", "surrogatepass")
    elif json.detect_encoding(raw) == "utf-8":
        data = raw
    else:  # UTF-16/32 (or UTF-8 with a BOM): scanned as UTF-8
        data = raw.decode(json.detect_encoding(raw), "surrogatepass").encode("utf-8", "surrogatepass")
    if json_depth_exceeds(data, max_depth):
        raise too_deep(max_depth)
    try:
        value = json.loads(raw, parse_constant=parse_constant)
    except RecursionError:  # on a very deep stack even MAX_JSON_DEPTH levels could be too many: the same answer
        raise too_deep(max_depth) from None
    if (b"\\u" in data and _SURROGATE_ESCAPE.search(data)) or (b"\xed" in data and _RAW_SURROGATE.search(data)):
        found = lone_surrogate(value)
        if found:
            raise surrogate_refused(*found)
    return value


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser on `json_loads`: too deep → 400 `{"detail": "JSON parse error - …"}`; a lone surrogate → 400
    field error on the top-level field that holds it (`{"text": ["`text` contains a lone UTF-16 surrogate …"]}`)."""

    def parse(self, stream, media_type=None, parser_context=None):
        encoding = parsers.get_encoding(parser_context or {})
        try:
            raw = stream.read()
            if codecs.lookup(encoding).name != "utf-8":
                raw = raw.decode(encoding)
            return json_loads(raw, parse_constant=strict_constant if self.strict else None)
        except JsonRefused as exc:
            if exc.code != "invalid_unicode":
                raise exceptions.ParseError(f"JSON parse error - {exc.message}") from None
            field = exc.path[0] if exc.path and isinstance(exc.path[0], str) else api_settings.NON_FIELD_ERRORS_KEY
            raise exceptions.ValidationError({field: [exc.message]}) from None
        except ValueError as exc:  # not JSON, or not in the request's charset
            raise exceptions.ParseError(f"JSON parse error - {exc}") from None
