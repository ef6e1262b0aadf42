"""Prompt token counts for admission and the context check, without torch or transformers.

Where a base model's files are on this machine (`BaseModel.local_path`), the count is exact: its own tokenizer
(`tokenizer.json` through the `tokenizers` library) and its chat template rendered as transformers renders it
(jinja2's ImmutableSandboxedEnvironment with trim_blocks/lstrip_blocks, loopcontrols, the `{% generation %}` tag,
a `tojson` filter that does not escape HTML, `raise_exception`, `strftime_now`, `dict` and `namespace`), over the
messages as the backends hand them to the template (content never null, tool-call arguments as objects, vLLM's
tool definitions with their null fields). Each model's files are loaded once, when the gateway's configuration
snapshot first names them, and again only when they change; nothing is loaded per request.

Without the files, or for what cannot be reproduced (TGI's own tool prompt, a template that fails to render), the
count is a bound instead (`exact` False): the UTF-8 bytes of every string the template sees (a token of a
byte-level BPE, SentencePiece or WordPiece tokenizer covers at least one byte) plus an allowance per message and
per request for the template's own text. docs/limits.md says where a bound can fall short.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

# The bound's allowances for what a chat template writes besides the messages' strings: role markers and
# separators (~5 tokens a message in ChatML, Llama 3, Gemma, Phi-3), BOS, the generation prompt and a default system
# prompt or date line (~5-35 a request), tool-use instructions (TGI's tool prompt: ~50). The strings' bytes already
# over-count most text several times, so these cover the templates' own text with room to spare.
MESSAGE_ALLOWANCE = 16
REQUEST_ALLOWANCE = 64
TOOLS_ALLOWANCE = 256
TEXT_ALLOWANCE = 8  # special tokens a tokenizer's post-processor adds to a text prompt (BOS, EOS)
# TGI renders tools with this instruction after the conversation (its default `tool_prompt`), so on TGI pools a
# count with tools is our rendering plus this text and the tools' JSON: close, not exact.
TGI_TOOL_PROMPT = ("Given the functions available, please respond with a JSON for a function call with its proper arguments "
                   "that best answers the given prompt.\n\nRespond in the format {name: function name, parameters: dictionary "
                   "of argument name and its value}.Do not use variables.")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True, slots=True)
class PromptCount:
    tokens: int
    exact: bool  # False: an upper bound (no tokenizer here, or a rendering the gateway cannot reproduce)
    # True: `tokens` is a lower bound, taken without tokenizing because it already exceeds the limit asked about
    # (PromptCounter.chat / text, `beyond`); then `exact` is False and the prompt is refused as too long.
    at_least: bool = False


# ---- the bound -------------------------------------------------------------------------------------


def _utf8(text) -> int:
    return len(text.encode("utf-8", "surrogatepass")) if text else 0


def chat_bound(messages: list[dict], tools: list[dict] | None) -> int:
    """An upper bound of a chat's prompt tokens for any template that adds at most the allowances."""
    total = REQUEST_ALLOWANCE + MESSAGE_ALLOWANCE * len(messages)
    for m in messages:
        total += _utf8(m.get("role")) + _utf8(m.get("content")) + _utf8(m.get("name")) + _utf8(m.get("tool_call_id"))
        for call in m.get("tool_calls") or ():
            total += _utf8(json.dumps(call, ensure_ascii=False)) + MESSAGE_ALLOWANCE
    if tools:
        total += _utf8(json.dumps(tools, ensure_ascii=False)) + TOOLS_ALLOWANCE
    return total


def text_bound(prompt: str) -> int:
    return _utf8(prompt) + TEXT_ALLOWANCE


class BoundCounter:
    """No tokenizer here: every count is a bound."""

    exact = False
    source = "bound (no tokenizer files on this machine)"

    def chat(self, messages: list[dict], tools: list[dict] | None, *, kind: str, beyond: int | None = None) -> PromptCount:
        return PromptCount(chat_bound(messages, tools), False)

    def text(self, prompt: str, *, kind: str, beyond: int | None = None) -> PromptCount:
        return PromptCount(text_bound(prompt), False)


BOUND = BoundCounter()


# ---- the chat template, as transformers renders it --------------------------------------------------


def _template_environment():
    """transformers.utils.chat_template_utils._cached_compile_jinja_template's environment, minus the assistant
    mask tracking (the `{% generation %}` tag renders its body, as it does there when not tracking)."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace)
    return env


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_templates(path: Path, config: dict) -> str | dict | None:
    """transformers' rule: chat_template.jinja and additional_chat_templates/*.jinja over the config's entries."""
    files = {}
    if (path / "chat_template.jinja").is_file():
        files["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name", "template"}, …]
        return {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t and "template" in t}
    return template if isinstance(template, (str, dict)) else None


def _vllm_tools(tools: list[dict]) -> list[dict]:
    """vLLM's `tool.model_dump()`: description and parameters always present (null when not given), extras after."""
    out = []
    for tool in tools:
        fn = tool["function"]
        dumped = {"name": fn["name"], "description": fn.get("description"), "parameters": fn.get("parameters")}
        dumped.update({k: v for k, v in fn.items() if k not in dumped})
        out.append({"type": "function", "function": dumped})
    return out


def _arguments(raw, kind: str):
    """Tool-call arguments as the backends give them to templates: the JSON object, parsed."""
    if not isinstance(raw, str):
        return raw
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {} if kind == "vllm" else raw
    return value if isinstance(value, dict) or kind != "vllm" else {}


def template_messages(messages: list[dict], *, kind: str) -> list[dict]:
    """The messages as the backend hands them to the chat template (vLLM's parse_chat_messages, the dev backend's
    `_content` + `template_messages`): content "" for null, tool-call arguments parsed; the dev backend drops `name`."""
    out = []
    for m in messages:
        msg = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            msg["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"].get("arguments"), kind)}}
                                 for c in m["tool_calls"]]
        if m.get("tool_call_id"):
            msg["tool_call_id"] = m["tool_call_id"]
        if m.get("name") and kind != "dev":
            msg["name"] = m["name"]
        out.append(msg)
    return out


class PromptCounter:
    """Exact counts for one base model: its tokenizer and chat template(s), loaded once."""

    exact = True

    def __init__(self, tokenizer, templates: str | dict | None, special_tokens: dict[str, str], source: str):
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens
        self.source = source
        self.max_token_bytes = _max_token_bytes(tokenizer)
        env = _template_environment() if templates else None
        if isinstance(templates, dict):
            self.templates = {name: env.from_string(t) for name, t in templates.items()}
        else:
            self.templates = {"default": env.from_string(templates)} if templates else {}

    def _template(self, tools):
        if tools is not None and "tool_use" in self.templates:
            return self.templates["tool_use"]
        return self.templates.get("default")

    def tokens(self, text: str, *, add_special_tokens: bool = False) -> int:
        # encode_batch_fast: the same ids as encode without the offsets, faster, and it releases the GIL (so a long
        # prompt counted in a worker thread does not hold up the gateway's event loop; encode holds it).
        return len(self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids)

    def render(self, messages: list[dict], tools: list[dict] | None, *, kind: str) -> str:
        """The chat prompt as the backend of `kind` renders it (add_generation_prompt, the special tokens' names)."""
        template = self._template(tools)
        if template is None:
            raise LookupError("the model has no chat template")
        if tools is not None and kind == "vllm":
            tools = _vllm_tools(tools)
        # apply_chat_template drops None-valued keys; template_messages writes none.
        return template.render(messages=template_messages(messages, kind=kind), tools=tools, documents=None,
                               add_generation_prompt=True, **self.special_tokens)

    def at_least(self, text: str, beyond: int | None) -> PromptCount | None:
        """A lower bound of `text`'s tokens when it already exceeds `beyond`, found without tokenizing: no token
        stands for more than `max_token_bytes` bytes of text (the tokenizer has no normalizer that could shrink it).
        A prompt far past the context (a 1 MB body) is refused for the price of its length, not of its tokenization."""
        if beyond is None or not self.max_token_bytes or len(text) * 4 <= beyond * self.max_token_bytes:
            return None  # cannot be past it (a character is at most 4 bytes): no encoding on the common path
        lower = -(-len(text.encode("utf-8", "surrogatepass")) // self.max_token_bytes)
        return PromptCount(lower, False, at_least=True) if lower > beyond else None

    def chat(self, messages: list[dict], tools: list[dict] | None, *, kind: str, beyond: int | None = None) -> PromptCount:
        """The chat's prompt tokens; with `beyond` (the context), possibly only a lower bound above it (`at_least`)."""
        try:
            rendered = self.render(messages, tools, kind=kind)
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception, no template: the backend answers in its words
            log.debug("chat template not rendered for counting (%s): a bound is reserved", exc)
            return PromptCount(chat_bound(messages, tools), False)
        if (lower := self.at_least(rendered, beyond)) is not None:
            return lower
        count = self.tokens(rendered)
        if kind == "tgi" and (tools or any(m.get("tool_calls") for m in messages)):
            # TGI writes tools and calls its own way (its tool prompt, its JSON): our rendering plus that text.
            extra = TGI_TOOL_PROMPT + json.dumps(tools or [], ensure_ascii=False)
            return PromptCount(count + self.tokens(extra) + MESSAGE_ALLOWANCE * (1 + len(messages)), False)
        return PromptCount(count, True)

    def text(self, prompt: str, *, kind: str, beyond: int | None = None) -> PromptCount:
        """A text prompt: TGI and vLLM tokenize it with the special tokens of the tokenizer's post-processor (BOS),
        the dev backend without. With `beyond`, possibly only a lower bound above it (`at_least`)."""
        if (lower := self.at_least(prompt, beyond)) is not None:
            return lower
        return PromptCount(self.tokens(prompt, add_special_tokens=kind != "dev"), True)


def _max_token_bytes(tokenizer) -> int | None:
    """The most UTF-8 bytes of text any one token stands for (a decoded partial character counts as U+FFFD's 3,
    more than the bytes it stands for), or None when a normalizer may shrink text before it is tokenized."""
    if tokenizer.normalizer is not None:
        return None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)
    return max((len(t.encode("utf-8", "surrogatepass")) for t in texts), default=0) or None


def load_counter(path: Path) -> PromptCounter:
    """A model folder's tokenizer (tokenizer.json), special tokens and chat templates, as transformers reads them."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    names = list(SPECIAL_TOKEN_NAMES) + [k for k in config if k.endswith("_token") and k not in SPECIAL_TOKEN_NAMES]
    special = {name: text for name in names if (text := _token_text(config.get(name))) is not None}
    # Special tokens the config names but tokenizer.json lacks are added, as transformers adds them.
    known = set(tokenizer.get_vocab(with_added_tokens=True))
    extra = [t for t in config.get("extra_special_tokens") or config.get("additional_special_tokens") or () if _token_text(t)]
    missing = [t for t in [*special.values(), *map(_token_text, extra)] if t not in known]
    if missing:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
    return PromptCounter(tokenizer, _read_templates(path, config), special, source=str(path))


# ---- once per base model ------------------------------------------------------------------------------

_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_cache: dict[str, tuple[tuple, object]] = {}
_lock = threading.Lock()


def _stamp(path: Path) -> tuple | None:
    stamp = []
    for name in _FILES:
        try:
            st = (path / name).stat()
        except OSError:
            if name == "tokenizer.json":
                return None
            continue
        stamp.append((name, st.st_mtime_ns, st.st_size))
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        stamp += sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in extra.glob("*.jinja"))
    return tuple(stamp)


def counter_for(local_path: str):
    """The counter for a base model's `local_path`: exact when its tokenizer.json is here, else `BOUND`.

    Loaded once and cached (again only when the files change), so a configuration reload costs a few stat calls."""
    if not local_path:
        return BOUND
    path = Path(local_path)
    stamp = _stamp(path)
    if stamp is None:
        return BOUND
    key = str(path.resolve())
    with _lock:
        cached = _cache.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            counter = load_counter(path)
        except Exception:  # noqa: BLE001 - a broken or unreadable folder must not stop the gateway: reserve bounds
            log.exception("token counting: could not load the tokenizer in %s; admission reserves upper bounds for its prompts", path)
            counter = BOUND
        _cache[key] = (stamp, counter)
        return counter
