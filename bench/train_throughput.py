"""LoRA training throughput: our trainer's step vs a plain transformers Trainer + peft baseline, same data, same run.

A randomly initialised Llama-3-8B-shaped model (no download), LoRA r=16 on all linear layers, bf16, SDPA,
rows of 2048 tokens, batch 4, no gradient checkpointing. Prints tokens/s, model TFLOP/s, MFU and peak memory
and appends the table to docs/benchmarks.md. `--tiny` runs a toy shape on CPU in seconds (a smoke test).

FLOPs per token = 4·N + 12·L·d·S: N = parameters doing matmuls (all but the input embedding; frozen weights
need no weight gradient, so 4·N rather than 6·N), plus attention at sequence length S (reference finetune.md).

Variants (one table, same run): the baseline; ours eager; ours with each decoder layer compiled; packed rows of
4 documents with SDPA's masked kernel and with FlexAttention's block mask. Each row is written as soon as it is
measured, and a failing variant is recorded as such, so one broken variant costs no other figure.

    python bench/train_throughput.py [--tiny] [--steps 10] [--docs-per-row 1] [--variants baseline,ours,...]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import random
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from finetune import trainer

LLAMA3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=176, vocab_size=512)


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    """A random Llama of this shape with LoRA r=16 all-linear (same seed for every variant)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=8192, tie_word_embeddings=False, use_cache=False)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    targets = trainer.resolve_target_modules(model, "all-linear")
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets, task_type="CAUSAL_LM"))


def make_rows(n_rows: int, seq: int, docs_per_row: int, vocab: int) -> list[list[trainer.Tokenized]]:
    """Full rows of `seq` tokens, each split into `docs_per_row` packed documents, every next token a label."""
    rng = random.Random(0)
    rows = []
    for _ in range(n_rows):
        cuts = sorted(rng.sample(range(1, seq), docs_per_row - 1)) if docs_per_row > 1 else []
        row = []
        for a, b in zip([0] + cuts, cuts + [seq]):
            ids = [rng.randrange(vocab) for _ in range(b - a)]
            row.append(trainer.Tokenized(len(rows), ids, ids[1:] + [trainer.IGNORE]))
        rows.append(row)
    return rows


def flops_per_token(model, shape: dict, seq: int) -> float:
    base = model.get_base_model()
    n = sum(p.numel() for p in base.parameters()) - base.get_input_embeddings().weight.numel()
    return 4 * n + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_ours(shape, rows, args, device, dtype, variant: "Variant") -> dict:
    """Our trainer's optimizer step: packed rows, chunked loss on label positions, fused AdamW, bf16 autocast."""
    model = build_model(shape, device, dtype, variant.attn)
    if variant.compile:
        trainer.compile_decoder_layers(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = [trainer.collate(rows[i:i + args.batch], 0, device) for i in range(0, len(rows), args.batch)]
    times = []
    for step in range(args.warmup + args.steps):
        batch = batches[step % len(batches)]
        _sync(device)
        t = time.perf_counter()
        with autocast:
            loss, n, _ = trainer.batch_loss(model, batch)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
    return _summary(model, shape, args, device, times)


def run_baseline(shape, rows, args, device, dtype, variant: "Variant") -> dict:
    """transformers.Trainer + peft as documented: labels = input_ids, full logits, SDPA, fused AdamW."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build_model(shape, device, dtype, variant.attn)
    data = [{k: v[0] for k, v in trainer.collate([row], 0, "cpu").items() if k != "targets"} for row in rows]
    for d in data:
        d["labels"] = d["input_ids"].clone()
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, a, state, *rest, **k):
            _sync(device)
            if state.global_step > args.warmup:
                times.append(time.perf_counter() - self.t)

    targs = TrainingArguments(output_dir=str(Path(args.tmp) / "hf"), per_device_train_batch_size=args.batch,
                              max_steps=args.warmup + args.steps, bf16=device.type == "cuda",
                              use_cpu=device.type != "cuda", optim="adamw_torch_fused" if device.type == "cuda"
                              else "adamw_torch", learning_rate=1e-4, logging_steps=10_000, save_strategy="no",
                              report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
                              gradient_checkpointing=False)
    Trainer(model=model, args=targs, train_dataset=data, callbacks=[Timer()]).train()
    return _summary(model, shape, args, device, times)


def _summary(model, shape, args, device, times) -> dict:
    tokens = args.batch * args.seq
    tps = tokens * len(times) / sum(times)
    tflops = tps * flops_per_token(model, shape, args.seq) / 1e12
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"tokens_per_s": tps, "tflops": tflops, "mfu": tflops / args.peak_tflops, "peak_gib": peak}


@dataclass(frozen=True)
class Variant:
    """One line of the table: which trainer, and how ours is set up."""

    name: str
    baseline: bool = False
    compile: bool = False
    attn: str = "sdpa"
    docs_per_row: int | None = None  # None: --docs-per-row

    def run(self, *a) -> dict:
        return (run_baseline if self.baseline else run_ours)(*a, self)


VARIANTS = {v.name: v for v in [
    Variant("baseline", baseline=True),
    Variant("ours"),
    Variant("ours-compiled", compile=True),
    Variant("ours-packed4", docs_per_row=4),
    Variant("ours-compiled-packed4", compile=True, docs_per_row=4),
    Variant("ours-compiled-flex-packed4", compile=True, attn="flex_attention", docs_per_row=4),
]}
LABELS = {"baseline": "transformers Trainer + peft"}
GPU_DEFAULT = "baseline,ours,ours-compiled,ours-compiled-packed4,ours-compiled-flex-packed4"
CPU_DEFAULT = "baseline,ours"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="toy shape on CPU (smoke test)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--docs-per-row", type=int, default=1, help=">1 packs documents (block-diagonal attention)")
    p.add_argument("--variants", help=f"comma-separated, from {', '.join(VARIANTS)} "
                                      f"(default: {GPU_DEFAULT} on a GPU, {CPU_DEFAULT} on the CPU)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--tmp", default="/tmp/train_throughput")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"))
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.steps, args.warmup = min(args.seq, 128), min(args.steps, 3), 1
    shape = TINY if args.tiny else LLAMA3_8B
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    names = (args.variants or (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)).split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    versions = f"torch {torch.__version__}, transformers {_version('transformers')}, peft {_version('peft')}"
    head = (f"\n### LoRA training throughput, {datetime.date.today()}, {gpu}, "
            f"{'tiny' if args.tiny else 'Llama-3-8B'} shape, r=16 all-linear, batch {args.batch} × {args.seq}, "
            f"{args.steps} timed steps after {args.warmup}; {versions}\n\n"
            "| trainer | docs/row | tokens/s | model TFLOP/s | MFU | peak GiB | × baseline |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(head, end="", flush=True)
    with out.open("a") as f:
        f.write(head)
    baseline_tps = None
    for name in names:
        v = VARIANTS[name]
        docs = v.docs_per_row or args.docs_per_row
        rows = make_rows(args.batch * 2, args.seq, docs, shape["vocab_size"])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            r = v.run(shape, rows, args, device, dtype)
        except torch.OutOfMemoryError:
            r = "out of memory"
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the others' figures
            traceback.print_exc()
            r = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        if isinstance(r, dict) and v.baseline:
            baseline_tps = r["tokens_per_s"]
        line = _row(LABELS.get(name, name), docs, r, baseline_tps)
        print(line, end="", flush=True)
        with out.open("a") as f:  # row by row: a later variant that hangs or crashes keeps these
            f.write(line)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _row(label: str, docs: int, r: dict | str, baseline_tps: float | None) -> str:
    if isinstance(r, str):
        return f"| {label} | {docs} | {r} | | | | |\n"
    ratio = f"{r['tokens_per_s'] / baseline_tps:.2f}" if baseline_tps else ""
    return (f"| {label} | {docs} | {r['tokens_per_s']:,.0f} | {r['tflops']:.1f} | {r['mfu']:.1%} | {r['peak_gib']:.1f} "
            f"| {ratio} |\n")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
