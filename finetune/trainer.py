"""LoRA supervised fine-tuning: a compact loop we control (cancel, checkpoints, packing), not transformers.Trainer.

Chat examples are tokenized once with the validator's `tokenize_chat_example` (loss only on assistant tokens
with weight ≠ 0), packed first-fit into rows of at most `max_seq_len` tokens with per-example position ids
(transformers turns restarting position ids into a block-diagonal causal mask, so packed examples never
attend to each other), and trained with AdamW + warmup + linear/cosine decay. Each epoch ends with an atomic
checkpoint that a restarted worker resumes from. bf16 autocast on CUDA, fp32 on CPU. No Django here.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.utils.checkpoint

from finetune.templating import SystemPrompt, tokenize_chat_example, with_system_prompt

IGNORE = -100
LOSS_CHUNK_ELEMENTS = 1 << 28  # logits above ~1 GiB in fp32 are computed in chunks, recomputed in backward
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.pt"


class TrainingDataError(ValueError):
    """A problem with the tenant's data, worded for the tenant."""


@dataclass
class Hyperparameters:
    """Examples per optimizer step = batch_size × gradient_accumulation_steps; learning_rate is absolute."""

    n_epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"
    seed: int = 0
    gradient_accumulation_steps: int = 1
    max_seq_len: int = 1024
    warmup_ratio: float = 0.03
    lr_scheduler: str = "linear"  # "linear" | "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    log_every: int = 5  # steps between metrics events

    @classmethod
    def coerce(cls, value: "Hyperparameters | dict[str, Any] | None") -> "Hyperparameters":
        if isinstance(value, cls):
            return value
        unknown = set(value or {}) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown hyperparameters: {sorted(unknown)}")
        hp = cls(**(value or {}))
        if hp.lr_scheduler not in ("linear", "cosine"):
            raise ValueError("lr_scheduler must be 'linear' or 'cosine'")
        if min(hp.n_epochs, hp.batch_size, hp.gradient_accumulation_steps, hp.max_seq_len, hp.lora_r) < 1:
            raise ValueError("n_epochs, batch_size, gradient_accumulation_steps, max_seq_len and lora_r must be >= 1")
        return hp


@dataclass
class TrainResult:
    """trained_tokens = all tokens of the examples processed (what is billed: file tokens × epochs);
    trainable_tokens = the assistant tokens the loss was taken on."""

    status: str  # "succeeded" | "cancelled"
    adapter_dir: Path | None
    steps: int
    total_steps: int
    epochs_completed: int
    trained_tokens: int
    trainable_tokens: int
    train_loss: float | None
    valid_loss: float | None
    resumed_from_step: int | None = None
    load_seconds: float | None = None  # tokenizer, data and base model loaded before the first step


@dataclass
class Tokenized:
    """One example ready to pack: ids and next-token targets (IGNORE where no loss is taken)."""

    number: int  # line in the file, or 1-based position
    input_ids: list[int]
    targets: list[int] = field(repr=False)

    @property
    def trainable(self) -> int:
        return sum(t != IGNORE for t in self.targets)


def tokenize_examples(tokenizer, examples: Sequence[Any], max_seq_len: int, what: str = "training",
                      system_prompt: SystemPrompt | None = None) -> list[Tokenized]:
    """Accept message lists, {"messages": [...], "tools"?: [...]} dicts or validation `Example`s; refuse
    over-long ones in words. Each is rendered with `system_prompt` as the gateway serves it (with_system_prompt)."""
    out = []
    for i, ex in enumerate(examples, start=1):
        number = getattr(ex, "line", i)
        messages = getattr(ex, "messages", None) or (ex["messages"] if isinstance(ex, dict) else ex)
        tools = getattr(ex, "tools", None) or (ex.get("tools") if isinstance(ex, dict) else None)
        ids, mask = tokenize_chat_example(tokenizer, with_system_prompt(messages, system_prompt), tools)
        if len(ids) > max_seq_len:
            with_prompt = " with the system prompt it is trained with" if system_prompt else ""
            raise TrainingDataError(f"{what} example {number} is longer than the context of {max_seq_len} tokens "
                                    f"({len(ids)} tokens{with_prompt}); shorten it or remove it")
        targets = [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]
        tok = Tokenized(number, ids, targets)
        if not tok.trainable and what == "training":
            raise TrainingDataError(f"{what} example {number} has no assistant tokens to learn from")
        out.append(tok)
    return out


def pack(examples: Sequence[Tokenized], max_seq_len: int) -> list[list[Tokenized]]:
    """First-fit decreasing into rows of ≤ max_seq_len tokens: few rows, little padding."""
    rows: list[list[Tokenized]] = []
    free: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(ex.input_ids)
        slot = next((i for i, f in enumerate(free) if f >= n), None)
        if slot is None:
            rows.append([ex])
            free.append(max_seq_len - n)
        else:
            rows[slot].append(ex)
            free[slot] -= n
    return rows


def collate(rows: Sequence[Sequence[Tokenized]], pad_id: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Rows padded to the longest; position ids restart per example (and for the padding tail)."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids, pos, tgt = [], [], []
    for row in rows:
        r_ids = [t for e in row for t in e.input_ids]
        r_pos = [p for e in row for p in range(len(e.input_ids))]
        r_tgt = [t for e in row for t in e.targets]
        pad = width - len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        pos.append(r_pos + list(range(pad)))
        tgt.append(r_tgt + [IGNORE] * pad)
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return {"input_ids": as_tensor(ids), "position_ids": as_tensor(pos), "targets": as_tensor(tgt)}


def _chunk_loss(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(hidden).float()
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss, (logits.argmax(-1) == targets).sum()


def batch_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(summed cross-entropy, label tokens, correct argmax predictions) of a collated batch.

    The decoder runs once; the vocabulary projection only on label positions (often well under half the
    tokens), in chunks recomputed during backward when the fp32 logits would exceed ~1 GiB.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                             attention_mask=None, use_cache=False).last_hidden_state
    keep = batch["targets"] != IGNORE
    hidden, targets = hidden[keep], batch["targets"][keep]
    lm_head = causal_lm.get_output_embeddings()
    chunk = max(1, LOSS_CHUNK_ELEMENTS // lm_head.out_features)
    if len(targets) <= chunk:
        loss, correct = _chunk_loss(hidden, lm_head, targets)
        return loss, len(targets), correct
    loss, correct = hidden.new_zeros((), dtype=torch.float32), torch.zeros((), dtype=torch.long, device=hidden.device)
    for s in range(0, len(targets), chunk):
        part = torch.utils.checkpoint.checkpoint(_chunk_loss, hidden[s:s + chunk], lm_head, targets[s:s + chunk],
                                                 use_reentrant=False)
        loss, correct = loss + part[0], correct + part[1]
    return loss, len(targets), correct


def lr_lambda(total_steps: int, warmup_steps: int, kind: str) -> Callable[[int], float]:
    """Multiplier of the base learning rate: linear warmup, then linear or cosine decay to 0."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


# ---------------------------------------------------------------------------------------------- checkpoints

def latest_checkpoint(output_dir: Path) -> Path | None:
    """The highest complete step-N folder (incomplete ones are only ever under a .tmp name)."""
    folder = Path(output_dir) / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step-*") if (m := CHECKPOINT_RE.match(p.name))]
    return max(found)[1] if found else None


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write into a sibling temporary folder, then rename: a killed worker never leaves a half checkpoint."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def _save_adapter(model, folder: Path, base_model_id: str) -> None:
    model.peft_config["default"].base_model_name_or_path = base_model_id
    model.save_pretrained(folder, save_embedding_layers=False)  # embeddings are never resized or trained


def _save_checkpoint(output_dir: Path, model, optimizer, scheduler, state: dict[str, Any], base_model_id: str) -> None:
    def write(tmp: Path) -> None:
        _save_adapter(model, tmp, base_model_id)
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / STATE_FILE)
    _atomic_dir(Path(output_dir) / "checkpoints" / f"step-{state['step']:06d}", write)


def _load_adapter_weights(model, folder: Path) -> None:
    """Load an adapter's LoRA weights into `model`; every LoRA parameter must be set by one of the same shape."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(folder / "adapter_model.safetensors"))
    lora = {name for name, _ in model.named_parameters() if "lora_" in name}
    loaded = set_peft_model_state_dict(model, weights)  # raises on a shape mismatch
    missing = sorted(name for name in loaded.missing_keys if name in lora)
    if missing or loaded.unexpected_keys:
        raise ValueError(f"the adapter to start from does not fit this LoRA: {len(missing)} LoRA weights missing "
                         f"({', '.join(missing[:3])}), {len(loaded.unexpected_keys)} unexpected")


def _load_checkpoint(folder: Path, model, optimizer, scheduler, hp: Hyperparameters) -> dict[str, Any]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    if state["hyperparameters"] != asdict(hp):
        raise ValueError(f"checkpoint {folder} was made with other hyperparameters; start a new job instead")
    set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    random.setstate(state["rng"]["python"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


# ---------------------------------------------------------------------------------------------- the loop

def resolve_target_modules(model: torch.nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """A sorted list of short module names ("all-linear" = every Linear but the output head): the saved
    adapter_config then names modules, not regexes or per-layer paths; a name matching nothing is refused."""
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError("target_modules must be a list of module names or 'all-linear'")
        return sorted(linear)
    missing = sorted(set(target_modules) - linear)
    if missing:
        raise ValueError(f"target_modules {missing} are not linear layers of this model; choose from {sorted(linear)}")
    return sorted(set(target_modules))


def load_lora_model(base_model_path: str | Path, hp: Hyperparameters, device: torch.device,
                    attn_implementation: str = "sdpa"):
    """Base in bf16 on CUDA (fp32 on CPU), frozen; LoRA on a list of modules (never a regex)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(base_model_path, dtype=dtype,
                                                attn_implementation=attn_implementation).to(device)
    torch.manual_seed(hp.seed)
    config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                        target_modules=resolve_target_modules(base, hp.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def compile_decoder_layers(model, backend: str = "inductor") -> None:
    """torch.compile each decoder layer in place ("regional" compilation).

    Fuses the memory-bound work between the matmuls (RMSNorm, rotary, SwiGLU, the LoRA scale-and-add, residuals)
    and lets the partitioner recompute cheap pointwise results in backward instead of saving them. The layers
    share compiled graphs (parameters are graph inputs): two compilations whatever the depth (the first layer's
    input, from the frozen embedding, needs no gradient; every later layer reuses the second graph);
    the embedding, mask construction and our chunked loss stay eager. Same numbers as eager within float
    rounding (tested on CPU); whether it is faster is measured by bench/train_throughput.py.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in causal_lm.get_decoder().layers:
        layer.compile(backend=backend)


def _micro_batches(tokenized: list[Tokenized], order: list[int], hp: Hyperparameters) -> list[list[list[Tokenized]]]:
    """Per optimizer step: its micro-batches (batch_size examples each), each packed into rows."""
    per_step = hp.batch_size * hp.gradient_accumulation_steps
    steps = []
    for s in range(0, len(order), per_step):
        idx = order[s:s + per_step]
        steps.append([pack([tokenized[i] for i in idx[m:m + hp.batch_size]], hp.max_seq_len)
                      for m in range(0, len(idx), hp.batch_size)])
    return steps


@torch.no_grad()
def evaluate(model, rows: list[list[Tokenized]], batch_rows: int, pad_id: int, device, autocast) -> tuple[float, float]:
    """(mean token loss, mean token accuracy) over the assistant tokens of packed validation rows."""
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    for s in range(0, len(rows), batch_rows):
        with autocast():
            loss, count, right = batch_loss(model, collate(rows[s:s + batch_rows], pad_id, device))
        loss_sum, n, correct = loss_sum + loss.item(), n + count, correct + right.item()
    model.train()
    return loss_sum / max(n, 1), correct / max(n, 1)


def prepare_run(base_model_path: str | Path, hp, dev: torch.device, attn_implementation: str, compile_layers: bool,
                n_examples: int):
    """What every training method starts with (train_lora here, finetune.dpo.train_dpo): the seeded LoRA model in
    train mode, its trainable parameters, AdamW, the warmup + decay schedule over the run's steps, and the autocast.
    `hp` needs the trainer's common fields (seed, rank…, learning_rate, weight_decay, batch_size,
    gradient_accumulation_steps, n_epochs, warmup_ratio, lr_scheduler); `n_examples` counts what a batch counts
    (examples, or pairs for DPO). Returns (model, params, optimizer, scheduler, steps_per_epoch, total_steps, autocast)."""
    random.seed(hp.seed)
    model = load_lora_model(base_model_path, hp, dev, attn_implementation)
    if compile_layers and dev.type == "cuda":
        compile_decoder_layers(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, fused=dev.type == "cuda")
    steps_per_epoch = math.ceil(n_examples / (hp.batch_size * hp.gradient_accumulation_steps))
    total_steps = steps_per_epoch * hp.n_epochs
    warmup = math.ceil(hp.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, hp.lr_scheduler))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else nullcontext
    return model, params, optimizer, scheduler, steps_per_epoch, total_steps, autocast


def train_lora(
    *,
    base_model_path: str | Path,
    base_model_id: str,
    train_examples: Sequence[Any],
    output_dir: str | Path,
    hyperparameters: Hyperparameters | dict[str, Any] | None = None,
    valid_examples: Sequence[Any] | None = None,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
    should_cancel: Callable[[], bool] = lambda: False,
    resume: bool = True,
    device: str | None = None,
    compile_layers: bool = False,
    attn_implementation: str = "sdpa",
    init_adapter: str | Path | None = None,
    system_prompt: SystemPrompt | None = None,
) -> TrainResult:
    """Train a LoRA adapter; returns a cancelled result if `should_cancel()` turns true (checked every micro-batch).

    `system_prompt`: every training and validation example is rendered with it exactly as the gateway serves chat
    requests (finetune.templating.with_system_prompt); its tokens are part of trained_tokens (never trained on).

    `init_adapter`: a folder with adapter_model.safetensors of the same rank and target modules whose weights the LoRA
    starts from (continuing an adapter, finetune/continuation.py); a checkpoint of this job, when resuming, wins.

    `compile_layers` compiles the decoder layers on CUDA (`compile_decoder_layers`; ignored on CPU, where the
    compilation would outlast a small job); `attn_implementation` is
    transformers' name ("sdpa", "flex_attention", …). Neither changes the result beyond float rounding.

    The final adapter goes to `output_dir/adapter` (adapter_config.json + adapter_model.safetensors, with
    base_model_name_or_path = base_model_id, the id serving matches on); checkpoints to `output_dir/checkpoints`.
    """
    from transformers import AutoTokenizer

    loading_started = time.monotonic()
    hp = Hyperparameters.coerce(hyperparameters)
    output_dir = Path(output_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    train = tokenize_examples(tokenizer, train_examples, hp.max_seq_len, "training", system_prompt)
    valid_rows = pack(tokenize_examples(tokenizer, valid_examples, hp.max_seq_len, "validation", system_prompt),
                      hp.max_seq_len) if valid_examples else []
    if not train:
        raise TrainingDataError("the training file has no examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    model, params, optimizer, scheduler, steps_per_epoch, total_steps, autocast = prepare_run(
        base_model_path, hp, dev, attn_implementation, compile_layers, len(train))

    state = {"step": 0, "epoch": 0, "trained_tokens": 0, "trainable_tokens": 0, "train_loss": None,
             "valid_loss": None, "hyperparameters": asdict(hp)}
    resumed_from = None
    checkpoint = latest_checkpoint(output_dir) if resume else None
    if init_adapter is not None and checkpoint is None:
        _load_adapter_weights(model, Path(init_adapter))
        on_event({"type": "message", "level": "info", "message": "Started from the given adapter's weights"})
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, hp)
        state = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng")}
        resumed_from = state["step"]
        on_event({"type": "message", "level": "info", "message": f"resumed from the checkpoint at step {resumed_from}"})

    load_seconds = time.monotonic() - loading_started
    on_event({"type": "message", "level": "info",
              "message": f"Loaded the base model and {len(train)} examples in {load_seconds:.1f} s"})

    def result(status: str, adapter_dir: Path | None = None) -> TrainResult:
        return TrainResult(status, adapter_dir, state["step"], total_steps, state["epoch"], state["trained_tokens"],
                           state["trainable_tokens"], state["train_loss"], state["valid_loss"], resumed_from,
                           load_seconds)

    started, tokens_seen, steps_done = time.monotonic(), 0, 0
    for epoch in range(state["epoch"], hp.n_epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed * 1000 + epoch)).tolist()
        for micro in _micro_batches(train, order, hp):
            n_labels = sum(e.trainable for rows in micro for row in rows for e in row)
            loss_sum, correct = 0.0, 0
            for rows in micro:
                if should_cancel():
                    on_event({"type": "message", "level": "info", "message": f"cancelled at step {state['step']}"})
                    return result("cancelled")
                with autocast():
                    loss, _, right = batch_loss(model, collate(rows, pad_id, dev))
                (loss / n_labels).backward()
                loss_sum, correct = loss_sum + loss.item(), correct + right.item()
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_tokens = sum(len(e.input_ids) for rows in micro for row in rows for e in row)
            state["step"] += 1
            state["trained_tokens"] += step_tokens
            state["trainable_tokens"] += n_labels
            state["train_loss"] = loss_sum / n_labels
            tokens_seen, steps_done = tokens_seen + step_tokens, steps_done + 1
            elapsed = time.monotonic() - started
            metrics = {"type": "metrics", "step": state["step"], "total_steps": total_steps, "epoch": epoch + 1,
                       "train_loss": state["train_loss"], "train_mean_token_accuracy": correct / n_labels,
                       "learning_rate": scheduler.get_last_lr()[0], "tokens_per_second": tokens_seen / elapsed,
                       "eta_seconds": elapsed / steps_done * (total_steps - state["step"]), "load_seconds": load_seconds}
            epoch_end = state["step"] % steps_per_epoch == 0
            if epoch_end and valid_rows:
                state["valid_loss"], valid_acc = evaluate(model, valid_rows, hp.batch_size, pad_id, dev, autocast)
                # Over the whole validation file: OpenAI's full_valid_* (its valid_* are on a batch; here the same).
                metrics.update(valid_loss=state["valid_loss"], valid_mean_token_accuracy=valid_acc,
                               full_valid_loss=state["valid_loss"], full_valid_mean_token_accuracy=valid_acc)
            if epoch_end or state["step"] % hp.log_every == 0:
                on_event(metrics)
        state["epoch"] = epoch + 1
        _save_checkpoint(output_dir, model, optimizer, scheduler, state, base_model_id)
        on_event({"type": "checkpoint", "step": state["step"], "epoch": state["epoch"]})

    adapter_dir = output_dir / "adapter"
    _atomic_dir(adapter_dir, lambda tmp: _save_adapter(model, tmp, base_model_id))
    return result("succeeded", adapter_dir)
