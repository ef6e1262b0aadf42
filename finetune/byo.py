"""Bring your own adapter: a tenant's PEFT LoRA, checked against its base model before anything is stored or served.

An upload is `adapter_config.json` + `adapter_model.safetensors` (what peft's `save_pretrained` writes), sent as the
two files or as one .zip / .tar / .tar.gz holding them (at its top or in one folder; peft's README.md beside them is
skipped). Nothing of it is unpickled or imported: the safetensors header is read as the format defines it (8 bytes
of little-endian length, then JSON), no tensor is loaded and no torch is imported in the web request. Refused, each
with its reason: pickled weights (.bin, .pt, …, or a pickle named .safetensors), any other file in an archive, a
path that climbs out of it or a link, more than FINETUNE_MAX_ADAPTER_BYTES, a config that is not a plain LoRA of one
of the tenant's base models, a target module the architecture lacks, a rank above what the tenant's pool for that
base model serves, a dtype other than F16 / BF16 / F32, and any tensor missing, unexpected or of the wrong shape
(lora_A [r, d_in], lora_B [d_out, r] from the base model's config.json, finetune.lora_math).

A valid upload becomes the tenant's `serving.Adapter` (source `uploaded`), stored beside trained ones under the
tenant's storage, and is deployed as a job's adapter is (finetune.deploy), unless the tenant turned automatic
deployment off.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import secrets
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from django.conf import settings
from django.db import transaction

from common.parsers import json_loads
from finetune import base_models, hub, lora_math, pools, storage
from finetune.services import SUFFIX_RE, FinetuneError
from serving import selectors as serving_selectors
from serving.models import Adapter, AdapterDeployment, BaseModel, ModelConfig
from tenants.models import Tenant
from tenants.services import Actor, audit_record

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SKIPPED_NAMES = frozenset({"README.md"})  # peft's model card: skipped, never stored
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
MAX_CONFIG_BYTES = 64 * 1024
MAX_ARCHIVE_MEMBERS = 16
COPY_CHUNK_BYTES = 1024 * 1024
# Bytes per element of the dtypes an adapter may hold (safetensors' names). vLLM and the dev backend load these.
ALLOWED_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}
# Config.json model types whose decoder layers are Llama's (the module names and shapes lora_math knows).
LLAMA_STYLE = frozenset({"llama", "mistral", "qwen2"})
ATTENTION_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
TENSOR_PREFIX = "base_model.model.model.layers"
MAX_PROBLEMS_SHOWN = 10


def max_upload_bytes() -> int:
    return settings.FINETUNE_MAX_ADAPTER_BYTES


@dataclass
class AdapterRefused(FinetuneError):
    """An upload that cannot be served, with every problem found (`problems`, the first MAX_PROBLEMS_SHOWN in the
    message)."""

    problems: list[str] = field(default_factory=list)


def _refuse(code: str, problems: list[str] | str, *, status: int = 400, param: str = "file") -> AdapterRefused:
    problems = [problems] if isinstance(problems, str) else problems
    shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    message = f"The adapter was refused: {shown}" + (f" (and {more} more)" if more > 0 else "")
    return AdapterRefused(message, status=status, code=code, param=param, problems=problems)


# ---- reading the upload --------------------------------------------------------------------------


@dataclass
class UploadPart:
    """One uploaded file: its client-side name and its bytes as a stream (Django's UploadedFile fits)."""

    name: str
    stream: BinaryIO
    size: int | None = None


def _is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _copy_capped(source: BinaryIO, target: Path, budget: list[int], what: str) -> int:
    """Copy `source` to `target`, counting against the shared `budget` (bytes left for the whole upload): 413 past it."""
    copied = 0
    with open(target, "wb") as out:
        while chunk := source.read(COPY_CHUNK_BYTES):
            copied += len(chunk)
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise _too_large(what)
            out.write(chunk)
    return copied


def _too_large(what: str) -> AdapterRefused:
    return _refuse("adapter_too_large", f"{what} takes the upload past {max_upload_bytes():,} bytes, the most an "
                                        "adapter may be (PLATFORM_FINETUNE_MAX_ADAPTER_BYTES)", status=413)


def _member_name(raw: str) -> str | None:
    """The file name an archive member stands for (`folder/adapter_config.json` → `adapter_config.json`), None for a
    folder entry; refuses absolute paths, `..`, backslashes and more than one folder level."""
    if "\\" in raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or "\x00" in raw:
        raise _refuse("unsafe_archive", f"the archive member {raw!r} has an absolute or Windows path")
    parts = [p for p in PurePosixPath(raw).parts if p not in ("", ".")]
    if ".." in parts:
        raise _refuse("unsafe_archive", f"the archive member {raw!r} climbs out of the archive ('..')")
    if raw.endswith("/") or not parts:
        return None
    if len(parts) > 2:
        raise _refuse("unexpected_file", f"the archive member {raw!r} is nested too deep: put {CONFIG_NAME} and "
                                         f"{WEIGHTS_NAME} at the archive's top or in one folder")
    return parts[-1]


def _wanted(name: str, raw: str, found: dict) -> bool:
    """Whether an archive member (file `name`, full path `raw`) is one to keep; refuses anything else but README.md."""
    if _is_pickle_name(name):
        raise _refuse("pickle_refused", f"{raw!r} is a pickled file: only safetensors weights are accepted "
                                        f"(peft's save_pretrained writes {WEIGHTS_NAME} by default)")
    if name in SKIPPED_NAMES:
        return False
    if name not in (CONFIG_NAME, WEIGHTS_NAME):
        raise _refuse("unexpected_file", f"the archive holds {raw!r}; it may hold only {CONFIG_NAME} and {WEIGHTS_NAME}")
    if name in found:
        raise _refuse("unexpected_file", f"the archive holds {name} twice ({found[name]!r} and {raw!r})")
    found[name] = raw
    return True


def _extract_zip(path: Path, folder: Path, budget: list[int]) -> None:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refuse("invalid_archive", f"the .zip cannot be read ({exc})") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise _refuse("unexpected_file", f"the archive holds {len(members)} entries; it may hold only {CONFIG_NAME} "
                                             f"and {WEIGHTS_NAME}")
        found: dict[str, str] = {}
        keep = []
        for info in members:
            name = _member_name(info.filename)
            if name is None:
                continue
            if (info.external_attr >> 16) & 0o170000 == 0o120000:  # a symbolic link stored by Unix zip -y
                raise _refuse("unsafe_archive", f"the archive member {info.filename!r} is a link")
            if _wanted(name, info.filename, found):
                keep.append((name, info))
        if sum(info.file_size for _, info in keep) > budget[0]:  # declared sizes, before inflating a byte
            raise _too_large("the archive's files")
        for name, info in keep:
            try:
                with archive.open(info) as source:  # reads at most the declared size, and checks its CRC
                    _copy_capped(source, folder / name, budget, name)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
                raise _refuse("invalid_archive", f"{info.filename!r} cannot be read from the .zip ({exc})") from None


def _extract_tar(path: Path, folder: Path, budget: list[int]) -> None:
    try:
        archive = tarfile.open(path, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise _refuse("invalid_archive", f"the .tar cannot be read ({exc})") from None
    with archive:
        found: dict[str, str] = {}
        seen = 0
        try:
            for member in archive:  # streamed: a listing of millions of entries is refused at the 17th
                seen += 1
                if seen > MAX_ARCHIVE_MEMBERS:
                    raise _refuse("unexpected_file", f"the archive holds more than {MAX_ARCHIVE_MEMBERS} entries; it "
                                                     f"may hold only {CONFIG_NAME} and {WEIGHTS_NAME}")
                name = _member_name(member.name)
                if member.issym() or member.islnk():
                    raise _refuse("unsafe_archive", f"the archive member {member.name!r} is a link")
                if member.isdir() or name is None:
                    continue
                if not member.isfile():
                    raise _refuse("unsafe_archive", f"the archive member {member.name!r} is not a regular file")
                if not _wanted(name, member.name, found):
                    continue
                if member.size > budget[0]:
                    raise _too_large(name)
                source = archive.extractfile(member)
                _copy_capped(source, folder / name, budget, name)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _refuse("invalid_archive", f"the .tar cannot be read ({exc})") from None


def _archive_kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(262 + 8)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00" or head[257:262] == b"ustar":
        return "tar"
    return None


def receive_upload(parts: list[UploadPart], folder: Path) -> None:
    """Write the upload's adapter_config.json and adapter_model.safetensors into `folder` (which exists), from the two
    files or from one archive, within FINETUNE_MAX_ADAPTER_BYTES in all. Refuses (AdapterRefused) anything else."""
    budget = [max_upload_bytes()]
    if not parts:
        raise _refuse("missing_file", f"send {CONFIG_NAME} and {WEIGHTS_NAME} as two 'file' parts, or one .zip or .tar "
                                      "holding both", param="file")
    for part in parts:
        if part.size is not None and part.size > max_upload_bytes():
            raise _too_large(repr(part.name))
        if _is_pickle_name(part.name):
            raise _refuse("pickle_refused", f"{part.name!r} is a pickled file: only safetensors weights are accepted "
                                            f"(peft's save_pretrained writes {WEIGHTS_NAME} by default)")
    if len(parts) == 1:
        staged = folder / ".archive"
        _copy_capped(parts[0].stream, staged, budget, repr(parts[0].name))
        kind = _archive_kind(staged)
        if kind is None:
            raise _refuse("invalid_archive", f"{parts[0].name!r} is neither a .zip nor a .tar archive: send "
                                             f"{CONFIG_NAME} and {WEIGHTS_NAME} as two 'file' parts, or one archive "
                                             "holding both")
        budget[0] += staged.stat().st_size  # the archive is not kept: only what it holds counts
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(staged, folder, budget)
        finally:
            staged.unlink(missing_ok=True)
    elif len(parts) == 2:
        names = sorted(Path(p.name or "").name for p in parts)
        if names != sorted((CONFIG_NAME, WEIGHTS_NAME)):
            raise _refuse("unexpected_file", f"two files must be named {CONFIG_NAME} and {WEIGHTS_NAME}; got "
                                             f"{', '.join(repr(n) for n in names)}")
        for part in parts:
            _copy_capped(part.stream, folder / Path(part.name).name, budget, repr(part.name))
    else:
        raise _refuse("unexpected_file", f"{len(parts)} files were sent; send {CONFIG_NAME} and {WEIGHTS_NAME}, or one "
                                         "archive holding both")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise _refuse("missing_file", f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing")


# ---- the adapter's config ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """What an adapter's config declares, checked: rank, alpha and the target modules (short names, sorted)."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model_name_or_path: str | None


# Settings of peft's LoraConfig that change which tensors exist or how they apply: served adapters are plain LoRA.
_MUST_BE_OFF = {
    "use_dora": "DoRA adapters are not served (vLLM loads plain LoRA)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) does not apply to Llama-style models",
    "lora_bias": "LoRA biases are not served",
    "use_qalora": "QA-LoRA adapters are not served",
}
_MUST_BE_EMPTY = {
    "rank_pattern": "per-module ranks (rank_pattern) are not served: one rank for every module",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not served",
    "modules_to_save": "modules_to_save (fully trained layers beside the LoRA) are not served",
    "layers_to_transform": "layers_to_transform is not served: the LoRA must cover every layer",
    "layer_replication": "layer_replication is not served",
    "target_parameters": "target_parameters is not served: name modules in target_modules",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) are not served",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not served",
    "exclude_modules": "exclude_modules is not served: list the modules to adapt in target_modules",
}


def read_config(raw: bytes) -> dict:
    if len(raw) > MAX_CONFIG_BYTES:
        raise _refuse("invalid_adapter_config", f"{CONFIG_NAME} is {len(raw):,} bytes; peft's is about 1 kB "
                                                f"(at most {MAX_CONFIG_BYTES:,})")
    try:
        config = json_loads(raw)
    except ValueError as exc:
        raise _refuse("invalid_adapter_config", f"{CONFIG_NAME} is not JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _refuse("invalid_adapter_config", f"{CONFIG_NAME} must be a JSON object")
    return config


def check_config(config: dict) -> LoraSpec:
    """The LoRA a peft adapter_config.json declares, or AdapterRefused with every setting that cannot be served."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') are served")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        problems.append(f"task_type is {config.get('task_type')!r}; chat models need 'CAUSAL_LM'")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        problems.append(f"r (the rank) must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"lora_alpha must be a positive number, got {alpha!r}")
    for key, why in _MUST_BE_OFF.items():
        if config.get(key):
            problems.append(f"{key} is on: {why}")
    for key, why in _MUST_BE_EMPTY.items():
        if config.get(key):
            problems.append(f"{key} is set: {why}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config.get('bias')!r}: bias terms are not served (use 'none')")
    targets = config.get("target_modules")
    resolved: tuple[str, ...] = ()
    if targets == "all-linear":
        resolved = lora_math.LLAMA_LINEAR_MODULES
    elif isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
        unknown = sorted({t for t in targets if t not in lora_math.LLAMA_LINEAR_MODULES})
        if unknown:
            problems.append(f"target_modules {unknown} are not linear layers of the base model's decoder; choose from "
                            f"{list(lora_math.LLAMA_LINEAR_MODULES)}")
        resolved = tuple(sorted(set(targets)))
    else:
        problems.append(f"target_modules must be a list of module names (or 'all-linear'), got {targets!r}: a regular "
                        "expression is not served")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        problems.append(f"base_model_name_or_path must be a string, got {base!r}")
    if problems:
        raise _refuse("invalid_adapter_config", problems)
    return LoraSpec(rank=rank, alpha=alpha, target_modules=resolved, base_model_name_or_path=base)


def _names_base_model(declared: str, base_model: BaseModel) -> bool:
    """Whether an adapter's base_model_name_or_path names `base_model`: its public name, its Hugging Face id, or a
    local folder whose name is the id's (a model saved under ~/models/<name>)."""
    if declared in (base_model.name, base_model.hf_id):
        return True
    tail = declared.rstrip("/").rsplit("/", 1)[-1].lower()
    return bool(tail) and tail == base_model.hf_id.rstrip("/").rsplit("/", 1)[-1].lower()


def base_model_for_upload(tenant: Tenant, model: str | None, spec: LoraSpec) -> BaseModel:
    """The tenant's base model the adapter is for: `model` (a public name) when given, else the one its config names.
    The config's base_model_name_or_path, when set, must name the same model."""
    usable = serving_selectors.base_models_for_tenant(tenant)
    declared = spec.base_model_name_or_path
    if model:
        bm = next((b for b in usable if b.name == model), None)
        if bm is None:
            raise FinetuneError(f"The model '{model}' does not exist or you do not have access to it.", status=404,
                                param="model", code="model_not_found")
        if declared and not _names_base_model(declared, bm):
            raise _refuse("base_model_mismatch", f"{CONFIG_NAME} says the adapter was trained on {declared!r}, not on "
                                                 f"{bm.name} ({bm.hf_id})", param="model")
        return bm
    matches = [b for b in usable if declared and _names_base_model(declared, b)]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(sorted(b.name for b in usable)) or "none"
    if not declared:
        raise _refuse("base_model_mismatch", f"{CONFIG_NAME} names no base model (base_model_name_or_path); say which "
                                             f"in 'model' (yours: {names})", param="model")
    raise _refuse("base_model_mismatch", f"{CONFIG_NAME} says the adapter was trained on {declared!r}, which is none of "
                                         f"your base models ({names}); name one in 'model' if it is", param="model")


def check_against_base_model(spec: LoraSpec, base_config: dict, *, max_rank: int | None, base_model: BaseModel) -> lora_math.LlamaShape:
    """The base model's shape, once the spec's rank and targets fit it and its pool."""
    model_type = base_config.get("model_type")
    if model_type is not None and model_type not in LLAMA_STYLE:
        raise _refuse("unsupported_base_model", f"{base_model.name} is a {model_type!r} model; uploaded adapters are "
                                                "checked for Llama-style models only", param="model")
    try:
        shape = lora_math.LlamaShape.from_config(base_config)
    except (TypeError, ValueError, ZeroDivisionError):
        shape = None
    if shape is None or not all((shape.hidden_size, shape.num_hidden_layers, shape.intermediate_size, shape.head_dim)):
        raise _refuse("unsupported_base_model", f"{base_model.name}'s architecture is not known here (no config.json), "
                                                "so an adapter's shapes cannot be checked; ask the platform team",
                      param="model")
    if max_rank is None:
        raise _refuse("rank_not_served", f"no pool serves {base_model.name} to you, so no adapter of it can be served; "
                                         "ask the platform team", status=409, param="model")
    if spec.rank > max_rank:
        raise _refuse("rank_not_served", f"rank {spec.rank} is above the highest LoRA rank your pool for "
                                         f"{base_model.name} serves ({max_rank}); train it again with r ≤ {max_rank}")
    return shape


# ---- the weights ---------------------------------------------------------------------------------


def expected_tensors(shape: lora_math.LlamaShape, spec: LoraSpec) -> dict[str, tuple[int, int]]:
    """Every tensor name peft saves for this LoRA, with its shape: lora_A [r, d_in], lora_B [d_out, r] per layer and
    target module."""
    dims = shape.module_shapes()
    expected = {}
    for layer in range(shape.num_hidden_layers):
        for module in spec.target_modules:
            block = "self_attn" if module in ATTENTION_MODULES else "mlp"
            d_in, d_out = dims[module]
            stem = f"{TENSOR_PREFIX}.{layer}.{block}.{module}"
            expected[f"{stem}.lora_A.weight"] = (spec.rank, d_in)
            expected[f"{stem}.lora_B.weight"] = (d_out, spec.rank)
    return expected


def read_safetensors_header(path: Path, *, max_header_bytes: int) -> dict[str, dict]:
    """The tensors a .safetensors file declares ({name: {dtype, shape, data_offsets}}), checked as the format demands:
    offsets in order, without gaps or overlaps, covering the data exactly, each span the size its dtype and shape
    make. Reads only the header; refuses a pickle (torch.save) under this name."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:2] == b"PK" or head[:1] == b"\x80":
            raise _refuse("pickle_refused", f"{WEIGHTS_NAME} is a PyTorch pickle (torch.save), not safetensors: save "
                                            "the adapter with safe_serialization (peft's default)")
        if len(head) < 8:
            raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME} is {size} bytes: too short to be safetensors")
        length = int.from_bytes(head, "little")
        if length > max_header_bytes or length > size - 8:
            raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME}'s header claims {length:,} bytes (the file has "
                                                 f"{size:,}; this adapter's header is at most {max_header_bytes:,})")
        raw = f.read(length)
    try:
        header = json_loads(raw)
    except ValueError as exc:
        raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME}'s header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME}'s header is not a JSON object")
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and isinstance(info.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in info["data_offsets"]))
        if not ok:
            raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME}: tensor {name!r} has no valid dtype, shape and "
                                                 "data_offsets")
        tensors[name] = info
        spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at or end < begin:
            raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME}: tensor {name!r}'s data [{begin}, {end}) "
                                                 f"{'overlaps' if begin < at else 'leaves a gap before'} byte {at}")
        at = end
    if at != size - 8 - length:
        raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME}: the tensors' data is {at:,} bytes but the file holds "
                                             f"{size - 8 - length:,} after its header")
    for name, info in tensors.items():
        width = ALLOWED_DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if width is not None and end - begin != math.prod(info["shape"]) * width:
            raise _refuse("invalid_safetensors", f"{WEIGHTS_NAME}: tensor {name!r} has {end - begin:,} bytes of data, "
                                                 f"not the {math.prod(info['shape']) * width:,} its dtype and shape make")
    return tensors


def check_tensors(tensors: dict[str, dict], expected: dict[str, tuple[int, int]]) -> None:
    """Every expected tensor present with its shape and an allowed dtype, and nothing else: AdapterRefused listing
    each difference (tensor, expected vs got)."""
    problems = []
    code = None
    for name, want in expected.items():
        info = tensors.get(name)
        if info is None:
            problems.append(f"tensor {name} is missing (expected shape {list(want)})")
            code = code or "missing_tensor"
            continue
        if tuple(info["shape"]) != want:
            problems.append(f"tensor {name} has shape {info['shape']}, expected {list(want)}")
            code = code or "tensor_shape_mismatch"
        if info["dtype"] not in ALLOWED_DTYPES:
            problems.append(f"tensor {name} is {info['dtype']}; allowed dtypes are {', '.join(ALLOWED_DTYPES)}")
            code = code or "dtype_not_allowed"
    for name in sorted(set(tensors) - set(expected)):
        problems.append(f"tensor {name} is not part of a LoRA of the declared target modules on this base model")
        code = code or "unexpected_tensor"
    if problems:
        raise _refuse(code, problems)


def check_adapter_folder(folder: Path, *, tenant: Tenant, model: str | None) -> tuple[BaseModel, LoraSpec, int]:
    """Check a received upload (adapter_config.json and adapter_model.safetensors in `folder`) against the tenant's base
    model and its pool. Returns (base model, spec, parameters) or raises AdapterRefused / FinetuneError."""
    spec = check_config(read_config((folder / CONFIG_NAME).read_bytes()))
    bm = base_model_for_upload(tenant, model, spec)
    base_config = base_models.model_config(bm)
    shape = check_against_base_model(spec, base_config, max_rank=pools.max_lora_rank_served(tenant, bm),
                                     base_model=bm)
    expected = expected_tensors(shape, spec)
    tensors = read_safetensors_header(folder / WEIGHTS_NAME, max_header_bytes=64 * 1024 + 512 * len(expected))
    check_tensors(tensors, expected)
    return bm, spec, lora_math.lora_param_count(base_config, spec.rank, spec.target_modules)


# ---- the service ---------------------------------------------------------------------------------


def adapters_dir(tenant_id: int) -> Path:
    """Uploaded adapters live under the tenant's storage, as trained ones do (STORAGE_DIR: readable by the backends)."""
    return storage.tenant_storage_dir(tenant_id) / "adapters"


def _uploaded_name(bm: BaseModel, tenant: Tenant, suffix: str, token: str) -> str:
    # The same shape as a trained adapter's name (finetune.services._fine_tuned_model_name), random where a job's id is.
    return f"ft:{bm.name}:{tenant.slug}:{suffix}:{token[:8]}"


@dataclass
class UploadOutcome:
    adapter: Adapter
    deployment: AdapterDeployment | None
    not_deployed: str  # why it was not deployed ("" when it was)


def adapter_upload(*, tenant: Tenant, actor: Actor, parts: list[UploadPart], model: str | None = None,
                   suffix: str | None = None, deploy: bool | None = None) -> UploadOutcome:
    """Store a tenant's own PEFT LoRA as its adapter once every check passed (module docstring), then deploy it to its
    base model's pool like a trained one: when `deploy` is None, as the tenant's model settings say for finished jobs.

    `parts`: the two files, or one .zip / .tar; at most FINETUNE_MAX_ADAPTER_BYTES in all (413). Refusals are
    AdapterRefused (400; 413 too large; 409 no pool) with every problem found; an unknown `model` is a 404; 503
    `storage_error` when storage fails. Nothing is kept of a refused upload. A deployment that fails leaves the adapter stored (deploy it again later)."""
    suffix = suffix or ""
    if not isinstance(suffix, str) or not SUFFIX_RE.match(suffix):
        raise FinetuneError("suffix must be at most 64 letters, digits, '-', '_' or '.'", param="suffix",
                            code="invalid_suffix")
    token = secrets.token_hex(12)
    root = adapters_dir(tenant.pk)
    staging, final = root / f".upload-{token}", root / token
    try:
        staging.mkdir(parents=True, exist_ok=False)
        receive_upload(parts, staging)
        bm, spec, parameters = check_adapter_folder(staging, tenant=tenant, model=model)
        name = _uploaded_name(bm, tenant, suffix, token)
        if len(name) > Adapter._meta.get_field("name").max_length:
            raise FinetuneError("the suffix is too long for this model's name; shorten it", param="suffix",
                                code="invalid_suffix")
        size = sum(f.stat().st_size for f in staging.iterdir() if f.is_file())
        os.rename(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        log.exception("storing an uploaded adapter under %s", staging)
        raise FinetuneError(f"The adapter could not be stored ({exc.strerror or exc}); nothing was kept. Please try "
                            "again later.", status=503, param="file", code="storage_error") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        with transaction.atomic():
            adapter = Adapter.objects.for_tenant(tenant).create(
                name=name, base_model=bm, path=str(final.resolve()), rank=spec.rank,
                alpha=max(1, round(spec.alpha)), target_modules=list(spec.target_modules), parameters=parameters,
                size_bytes=size, source=Adapter.Source.UPLOADED)
            audit_record(tenant=tenant, actor=actor, action="finetune.adapter_uploaded", target=adapter,
                         data={"adapter": name, "base_model": bm.name, "rank": spec.rank,
                               "target_modules": list(spec.target_modules), "bytes": size})
            hub.push_on_commit(adapter.pk, tenant.pk)  # a copy in the tenant's Hub repository, as a trained one gets
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return _deploy_uploaded(tenant=tenant, actor=actor, adapter=adapter, deploy=deploy)


def _deploy_uploaded(*, tenant: Tenant, actor: Actor, adapter: Adapter, deploy: bool | None) -> UploadOutcome:
    from finetune import deploy as deployment_service

    if deploy is None:
        config = ModelConfig.objects.for_tenant(tenant).first()
        deploy = config is None or config.auto_deploy_finetuned
    if not deploy:
        return UploadOutcome(adapter, None, "not asked to deploy it (automatic deployment is off in the model settings)")
    try:
        deployment = deployment_service.adapter_deploy(tenant=tenant, adapter=adapter, actor=actor)
    except deployment_service.DeployError as exc:
        return UploadOutcome(adapter, None, str(exc))
    return UploadOutcome(adapter, deployment, "")


def parts_from_files(files: Iterable) -> list[UploadPart]:
    """UploadParts from Django's UploadedFiles."""
    return [UploadPart(name=f.name or "", stream=f, size=getattr(f, "size", None)) for f in files]


def bytes_part(name: str, data: bytes) -> UploadPart:
    """An UploadPart of bytes in memory (tests, scripts)."""
    return UploadPart(name=name, stream=io.BytesIO(data), size=len(data))
