"""Preference tuning (DPO, Rafailov et al. 2023) with LoRA, on the supervised trainer's pieces.

Each preference example is two conversations, the input followed by the preferred and by the non-preferred output
(`validation.preference_pair`), tokenized with the chat template as the trainer does (`tokenize_chat_example`; only the
output's tokens are scored). The policy is the LoRA model; the **reference** is the starting model — the base, or the
adapter a job continues from — whose log-probabilities of every pair are computed once before the first step (one
forward pass over the data, no second model in memory) and kept in the checkpoints, so a resumed job keeps the same
reference. With `reference_free` the reference log-probabilities are 0 (the loss then rewards the policy's own
margin, as reference-free DPO / SimPO without its length normalisation do); the platform's jobs use the reference.

Loss per pair: −log σ(β·[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]), log-probabilities
summed over the output's tokens; rewards are β·(log π − log π_ref) of each output. With `sft_weight` α > 0 the pair's
loss also holds α times the preferred output's negative log-likelihood per token (DPO + NLL, as RPO, Pang et al. 2024,
and TRL's `rpo_alpha`): DPO alone only widens the gap between the two outputs, and where they differ in one place — a
sign-off after the same answer — it pushes the non-preferred output's end of turn down, which the model then also
skips after the sign-off (it repeats it); the NLL term keeps the preferred output whole, its end of turn included.
Packing, checkpoints (atomic, with the optimizer, scheduler and RNG states), resume, cancel, warmup and decay are the
trainer's. No Django here.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from finetune.templating import SystemPrompt, tokenize_chat_example, with_system_prompt
from finetune.trainer import (
    IGNORE,
    LOSS_CHUNK_ELEMENTS,
    Hyperparameters,
    Tokenized,
    TrainingDataError,
    TrainResult,
    _atomic_dir,
    _load_adapter_weights,
    _load_checkpoint,
    _save_adapter,
    _save_checkpoint,
    collate,
    latest_checkpoint,
    pack,
    prepare_run,
)
from finetune.validation import Example, preference_pair

DEFAULT_BETA = 0.1  # OpenAI's "auto" beta


@dataclass
class DPOHyperparameters(Hyperparameters):
    """The trainer's hyperparameters (batch_size counts pairs) plus DPO's beta and the reference-free switch."""

    beta: float = DEFAULT_BETA
    reference_free: bool = False
    sft_weight: float = 0.0  # α: the preferred output's NLL per token added to each pair's loss (0: DPO alone)

    @classmethod
    def coerce(cls, value):
        hp = super().coerce(value)
        if not hp.beta > 0:
            raise ValueError("beta must be > 0")
        if not hp.sft_weight >= 0:
            raise ValueError("sft_weight must be >= 0")
        return hp


@dataclass
class Pair:
    number: int  # line in the file, or 1-based position
    chosen: Tokenized
    rejected: Tokenized

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)

    @property
    def trainable(self) -> int:
        return self.chosen.trainable + self.rejected.trainable


def _conversations(ex: Any) -> tuple[list, list, list | None]:
    """(chosen, rejected, tools) of a validator `Example` or of a dict in OpenAI's preference format."""
    if isinstance(ex, Example):
        if ex.preferred_output is None:
            raise TrainingDataError(f"example {ex.line} is not a preference example (input, preferred_output, "
                                    "non_preferred_output)")
        chosen, rejected = preference_pair(ex)
        return chosen, rejected, ex.tools
    inp = ex["input"]
    example = Example(0, inp["messages"], tools=inp.get("tools"), preferred_output=ex["preferred_output"],
                      non_preferred_output=ex["non_preferred_output"])
    chosen, rejected = preference_pair(example)
    return chosen, rejected, example.tools


def tokenize_pairs(tokenizer, examples: Sequence[Any], max_seq_len: int, what: str = "training",
                   system_prompt: SystemPrompt | None = None) -> list[Pair]:
    """Both conversations of each pair, targets only on the output's tokens; over-long ones refused in words. The
    input is rendered with `system_prompt` as the gateway serves it (with_system_prompt)."""
    pairs = []
    for i, ex in enumerate(examples, start=1):
        number = getattr(ex, "line", i)
        chosen, rejected, tools = _conversations(ex)
        sides = []
        for messages, side in ((chosen, "preferred_output"), (rejected, "non_preferred_output")):
            ids, mask = tokenize_chat_example(tokenizer, with_system_prompt(messages, system_prompt), tools)
            if len(ids) > max_seq_len:
                with_prompt = " with the system prompt it is trained with" if system_prompt else ""
                raise TrainingDataError(f"{what} example {number} with its {side} is longer than the context of "
                                        f"{max_seq_len} tokens ({len(ids)} tokens{with_prompt}); shorten it or remove it")
            targets = [ids[j + 1] if mask[j + 1] else IGNORE for j in range(len(ids) - 1)] + [IGNORE]
            tok = Tokenized(number, ids, targets)
            if not tok.trainable:
                raise TrainingDataError(f"{what} example {number} has no {side} tokens to score")
            sides.append(tok)
        pairs.append(Pair(number, *sides))
    return pairs


def _token_logps(hidden: torch.Tensor, lm_head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def sequence_logps(model, sequences: Sequence[Tokenized], max_seq_len: int, pad_id: int, device) -> torch.Tensor:
    """Summed log-probability of each sequence's target tokens, in the order given (packed into rows first, as
    the trainer packs; packed sequences never attend to each other). The vocabulary projection runs only on target
    positions, in chunks recomputed during backward when its fp32 logits would exceed ~1 GiB."""
    rows = pack(sequences, max_seq_len)
    batch = collate(rows, pad_id, device)
    where = {id(t): k for k, t in enumerate(sequences)}
    segment = torch.tensor([where[id(e)] for row in rows for e in row for t in e.targets if t != IGNORE],
                           dtype=torch.long, device=device)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.get_decoder()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                     attention_mask=None, use_cache=False).last_hidden_state
    keep = batch["targets"] != IGNORE
    hidden, targets = hidden[keep], batch["targets"][keep]
    lm_head = causal_lm.get_output_embeddings()
    chunk = max(1, LOSS_CHUNK_ELEMENTS // lm_head.out_features)
    if len(targets) <= chunk:
        logps = _token_logps(hidden, lm_head, targets)
    else:
        logps = torch.cat([torch.utils.checkpoint.checkpoint(_token_logps, hidden[s:s + chunk], lm_head,
                                                             targets[s:s + chunk], use_reentrant=False)
                           for s in range(0, len(targets), chunk)])
    return torch.zeros(len(sequences), dtype=torch.float32, device=device).index_add(0, segment, logps)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair, chosen reward, rejected reward): rewards are β·(log π − log π_ref) of each output, the loss
    −log σ(chosen reward − rejected reward)."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def preferred_nll(policy_chosen: torch.Tensor, chosen_tokens: Sequence[int]) -> torch.Tensor:
    """The preferred output's negative log-likelihood per token, per pair (what `sft_weight` weighs)."""
    return -policy_chosen / torch.tensor(chosen_tokens, dtype=policy_chosen.dtype, device=policy_chosen.device)


def _pair_logps(model, pairs: Sequence[Pair], hp: Hyperparameters, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    logps = sequence_logps(model, [t for p in pairs for t in (p.chosen, p.rejected)], hp.max_seq_len, pad_id, device)
    return logps[0::2], logps[1::2]


@torch.no_grad()
def reference_logps(model, pairs: Sequence[Pair], hp: DPOHyperparameters, pad_id: int, device, autocast,
                    should_cancel: Callable[[], bool] = lambda: False) -> list[list[float]] | None:
    """[[log π_ref(chosen), log π_ref(rejected)], …] with the model's current (starting) weights; zeros when
    reference-free; None when cancelled meanwhile."""
    if hp.reference_free:
        return [[0.0, 0.0] for _ in pairs]
    model.eval()
    out: list[list[float]] = []
    for s in range(0, len(pairs), hp.batch_size):
        if should_cancel():
            return None
        with autocast():
            chosen, rejected = _pair_logps(model, pairs[s:s + hp.batch_size], hp, pad_id, device)
        out += [[c, r] for c, r in zip(chosen.tolist(), rejected.tolist())]
    model.train()
    return out


@torch.no_grad()
def evaluate_pairs(model, pairs: Sequence[Pair], reference: list[list[float]], hp: DPOHyperparameters, pad_id: int,
                   device, autocast) -> dict[str, float]:
    """Mean loss, reward margin and accuracy (share of pairs whose chosen reward is higher) over held-out pairs."""
    model.eval()
    losses, margins = [], []
    for s in range(0, len(pairs), hp.batch_size):
        with autocast():
            chosen, rejected = _pair_logps(model, pairs[s:s + hp.batch_size], hp, pad_id, device)
        ref = torch.tensor(reference[s:s + hp.batch_size], dtype=torch.float32, device=device)
        loss, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], hp.beta)
        losses += loss.tolist()
        margins += (cr - rr).tolist()
    model.train()
    return {"valid_loss": sum(losses) / len(losses), "valid_reward_margin": sum(margins) / len(margins),
            "valid_reward_accuracy": sum(m > 0 for m in margins) / len(margins)}


def train_dpo(
    *,
    base_model_path: str | Path,
    base_model_id: str,
    train_examples: Sequence[Any],
    output_dir: str | Path,
    hyperparameters: DPOHyperparameters | dict[str, Any] | None = None,
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
    """Train a LoRA adapter with the DPO loss; the same arguments, events, checkpoints and result as
    `trainer.train_lora` (`system_prompt` renders each pair's input as the gateway serves it). `train_examples`: validator `Example`s of preference data, or dicts in OpenAI's preference
    format. `init_adapter` (continuing an adapter) is also the reference: its log-probabilities are the ones the
    rewards are measured against."""
    from transformers import AutoTokenizer

    loading_started = time.monotonic()
    hp = DPOHyperparameters.coerce(hyperparameters)
    output_dir = Path(output_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    train = tokenize_pairs(tokenizer, train_examples, hp.max_seq_len, "training", system_prompt)
    valid = tokenize_pairs(tokenizer, valid_examples, hp.max_seq_len, "validation", system_prompt) if valid_examples else []
    if not train:
        raise TrainingDataError("the training file has no examples")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    model, params, optimizer, scheduler, steps_per_epoch, total_steps, autocast = prepare_run(
        base_model_path, hp, dev, attn_implementation, compile_layers, len(train))
    per_step = hp.batch_size * hp.gradient_accumulation_steps

    state: dict[str, Any] = {"step": 0, "epoch": 0, "trained_tokens": 0, "trainable_tokens": 0, "train_loss": None,
                             "valid_loss": None, "hyperparameters": asdict(hp)}
    resumed_from = None
    checkpoint = latest_checkpoint(output_dir) if resume else None

    def result(status: str, adapter_dir: Path | None = None) -> TrainResult:
        return TrainResult(status, adapter_dir, state["step"], total_steps, state["epoch"], state["trained_tokens"],
                           state["trainable_tokens"], state["train_loss"], state["valid_loss"], resumed_from,
                           load_seconds)

    load_seconds = None
    if checkpoint is not None:  # the reference of the first attempt comes with the checkpoint
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler, hp)
        state = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng")}
        resumed_from = state["step"]
        on_event({"type": "message", "level": "info", "message": f"resumed from the checkpoint at step {resumed_from}"})
    else:
        if init_adapter is not None:
            _load_adapter_weights(model, Path(init_adapter))
            on_event({"type": "message", "level": "info", "message": "Started from the given adapter's weights"})
        reference_started = time.monotonic()
        state["reference_logps"] = reference_logps(model, train, hp, pad_id, dev, autocast, should_cancel)
        state["valid_reference_logps"] = reference_logps(model, valid, hp, pad_id, dev, autocast) if valid else []
        if state["reference_logps"] is None:
            load_seconds = time.monotonic() - loading_started
            on_event({"type": "message", "level": "info", "message": "cancelled at step 0"})
            return result("cancelled")
        what = ("no reference (reference-free)" if hp.reference_free else
                f"the reference log-probabilities of {len(train) + len(valid)} pairs (the starting model's) in "
                f"{time.monotonic() - reference_started:.1f} s")
        on_event({"type": "message", "level": "info", "message": f"DPO (beta {hp.beta:g}): {what}"})
    reference = state["reference_logps"]

    load_seconds = time.monotonic() - loading_started
    on_event({"type": "message", "level": "info",
              "message": f"Loaded the base model and {len(train)} preference pairs in {load_seconds:.1f} s"})

    started, tokens_seen, steps_done = time.monotonic(), 0, 0
    for epoch in range(state["epoch"], hp.n_epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed * 1000 + epoch)).tolist()
        for s in range(0, len(order), per_step):
            step_pairs = order[s:s + per_step]
            sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "correct": 0, "nll": 0.0}
            for m in range(0, len(step_pairs), hp.batch_size):
                if should_cancel():
                    on_event({"type": "message", "level": "info", "message": f"cancelled at step {state['step']}"})
                    return result("cancelled")
                idx = step_pairs[m:m + hp.batch_size]
                ref = torch.tensor([reference[i] for i in idx], dtype=torch.float32, device=dev)
                with autocast():
                    chosen, rejected = _pair_logps(model, [train[i] for i in idx], hp, pad_id, dev)
                loss, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], hp.beta)
                objective = loss
                if hp.sft_weight:
                    nll = preferred_nll(chosen, [train[i].chosen.trainable for i in idx])
                    objective = loss + hp.sft_weight * nll
                    sums["nll"] += nll.sum().item()
                (objective.sum() / len(step_pairs)).backward()
                sums["loss"] += loss.sum().item()
                sums["chosen"] += cr.sum().item()
                sums["rejected"] += rr.sum().item()
                sums["correct"] += int((cr > rr).sum().item())
            torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            n = len(step_pairs)
            step_tokens = sum(train[i].tokens for i in step_pairs)
            state["step"] += 1
            state["trained_tokens"] += step_tokens
            state["trainable_tokens"] += sum(train[i].trainable for i in step_pairs)
            state["train_loss"] = sums["loss"] / n
            tokens_seen, steps_done = tokens_seen + step_tokens, steps_done + 1
            elapsed = time.monotonic() - started
            metrics = {"type": "metrics", "step": state["step"], "total_steps": total_steps, "epoch": epoch + 1,
                       "train_loss": state["train_loss"],
                       "train_reward_margin": (sums["chosen"] - sums["rejected"]) / n,
                       "train_reward_accuracy": sums["correct"] / n,
                       "train_chosen_reward": sums["chosen"] / n, "train_rejected_reward": sums["rejected"] / n,
                       **({"train_preferred_nll": sums["nll"] / n} if hp.sft_weight else {}),
                       "learning_rate": scheduler.get_last_lr()[0], "tokens_per_second": tokens_seen / elapsed,
                       "eta_seconds": elapsed / steps_done * (total_steps - state["step"]), "load_seconds": load_seconds}
            epoch_end = state["step"] % steps_per_epoch == 0
            if epoch_end and valid:
                scores = evaluate_pairs(model, valid, state["valid_reference_logps"], hp, pad_id, dev, autocast)
                state["valid_loss"] = scores["valid_loss"]
                metrics.update(scores)
            if epoch_end or state["step"] % hp.log_every == 0:
                on_event(metrics)
        state["epoch"] = epoch + 1
        _save_checkpoint(output_dir, model, optimizer, scheduler, state, base_model_id)
        on_event({"type": "checkpoint", "step": state["step"], "epoch": state["epoch"]})

    adapter_dir = output_dir / "adapter"
    _atomic_dir(adapter_dir, lambda tmp: _save_adapter(model, tmp, base_model_id))
    return result("succeeded", adapter_dir)
