"""The LoRA trainer on the offline tiny model: it learns, masks, packs, cancels and resumes (CPU, seconds)."""

import json
import random
import sys
import zlib

import pytest
import torch

from finetune.trainer import (
    IGNORE,
    TrainingDataError,
    batch_loss,
    collate,
    latest_checkpoint,
    lr_lambda,
    pack,
    tokenize_examples,
    train_lora,
)

ANSWER = "ZEBRA-42 approved"
HP = dict(n_epochs=3, batch_size=5, learning_rate=1e-2, lora_r=8, lora_alpha=16, target_modules="all-linear",
          log_every=5, seed=0)


def examples(n, seed=0, answer=ANSWER):
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the teacher", "our team", "the model", "a student"]
    verbs = ["sees", "likes", "builds", "reads", "writes", "finds", "helps"]
    objects = ["a book", "the answer", "some water", "the door", "a letter", "the garden"]
    return [{"messages": [{"role": "user", "content": f"Can {rng.choice(subjects)} {rng.choice(verbs)} "
                                                      f"{rng.choice(objects)}?"},
                          {"role": "assistant", "content": answer}]} for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tiny_model_path, tmp_path_factory):
    """One uninterrupted 30-step run shared by several tests."""
    events = []
    out = tmp_path_factory.mktemp("run")
    result = train_lora(base_model_path=tiny_model_path, base_model_id="platform/tiny-chat",
                        train_examples=examples(50), valid_examples=examples(5, seed=1), output_dir=out,
                        hyperparameters=HP, on_event=events.append)
    return result, events


def test_learns_an_exact_answer_on_unseen_prompts(trained, tiny_model_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = trained
    assert result.status == "succeeded" and result.steps == result.total_steps == 30
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), result.adapter_dir)
    for prompt in ["What is the price of the train today?", "Hello! How can I help you today?"]:
        inputs = tiny_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        assert tiny_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) == ANSWER


def test_adapter_files_metrics_and_token_counts(trained, tiny_tokenizer):
    result, events = trained
    files = {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "platform/tiny-chat"
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    per_epoch = tokenize_examples(tiny_tokenizer, examples(50), 1024)
    assert result.trained_tokens == 3 * sum(len(e.input_ids) for e in per_epoch)
    assert result.trainable_tokens == 3 * sum(e.trainable for e in per_epoch)
    metrics = [e for e in events if e["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20, 25, 30]
    epoch_ends = [m for m in metrics if "valid_loss" in m]
    assert [m["step"] for m in epoch_ends] == [10, 20, 30]
    assert epoch_ends[-1]["valid_loss"] < epoch_ends[0]["valid_loss"]
    assert metrics[-1]["train_mean_token_accuracy"] == 1.0 and metrics[-1]["eta_seconds"] == 0
    assert all(m["tokens_per_second"] > 0 for m in metrics)
    assert [e["step"] for e in events if e["type"] == "checkpoint"] == [10, 20, 30]


def test_targets_skip_user_system_and_weight_zero_turns(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yes.", "weight": 0}, {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "No."}]
    (ex,) = tokenize_examples(tiny_tokenizer, [messages], 1024)
    learned = [t for t in ex.targets if t != IGNORE]
    assert tiny_tokenizer.decode(learned, skip_special_tokens=False) == "No.<|end|><|eos|>"
    # target j is the token after position j
    assert all(t == IGNORE or t == ex.input_ids[j + 1] for j, t in enumerate(ex.targets))


def test_packed_examples_do_not_attend_to_each_other(tiny_model_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, attn_implementation="sdpa")
    a, b, c = tokenize_examples(tiny_tokenizer, examples(3), 1024)
    rows = pack([a, b, c], max_seq_len=10_000)
    assert len(rows) == 1
    with torch.no_grad():
        packed, n, _ = batch_loss(model, collate(rows, 0, "cpu"))
        alone = [batch_loss(model, collate([[e]], 0, "cpu")) for e in (a, b, c)]
    assert n == sum(x[1] for x in alone)
    assert packed.item() == pytest.approx(sum(x[0].item() for x in alone), rel=1e-5)


APPROVE = {"type": "function", "function": {"name": "approve", "parameters": {"type": "object"}}}
CALL_TEXT = '<|tool_call|>{"name": "approve", "arguments": {"ticket": "Z42"}}<|end|><|eos|>'


def tool_examples(n, seed=0):
    """Each asks something, calls approve(ticket="Z42"), reads the result and answers."""
    call = {"id": "call_1", "type": "function", "function": {"name": "approve", "arguments": '{"ticket": "Z42"}'}}
    return [{"tools": [APPROVE], "messages": [
        *ex["messages"][:1], {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "done"}, {"role": "assistant", "content": "Approved."}]}
        for ex in examples(n, seed)]


def test_trains_on_tool_calls_with_the_validators_counts(tiny_model_path, tiny_tokenizer, tmp_path):
    from finetune.validation import validate_jsonl

    data = "\n".join(json.dumps(ex) for ex in tool_examples(10)).encode()
    validated = validate_jsonl(data, tokenizer=tiny_tokenizer)
    assert validated.ok, validated.problems
    tokens = len(tiny_tokenizer(CALL_TEXT + "Approved.<|end|><|eos|>", add_special_tokens=False)["input_ids"])
    assert [ex.trainable_tokens for ex in validated.examples] == [tokens] * 10  # the call is learned, the result is not

    events = []
    result = train_lora(base_model_path=tiny_model_path, base_model_id="platform/tiny-chat",
                        train_examples=validated.examples, valid_examples=tool_examples(2, seed=1), output_dir=tmp_path,
                        hyperparameters={**HP, "n_epochs": 2, "batch_size": 5}, on_event=events.append)
    assert result.status == "succeeded" and result.steps == 4
    assert result.trained_tokens == 2 * validated.total_tokens  # the tools block is in every example's tokens
    assert result.trainable_tokens == 2 * validated.trainable_tokens
    valid_losses = [e["valid_loss"] for e in events if e["type"] == "metrics" and "valid_loss" in e]
    assert len(valid_losses) == 2 and valid_losses[1] < valid_losses[0]  # held-out calls get likelier


def test_pack_first_fit_respects_the_row_limit(tiny_tokenizer):
    tokenized = tokenize_examples(tiny_tokenizer, examples(20), 1024)
    limit = 3 * max(len(e.input_ids) for e in tokenized)
    rows = pack(tokenized, limit)
    assert sorted(e.number for row in rows for e in row) == list(range(1, 21))
    assert all(sum(len(e.input_ids) for e in row) <= limit for row in rows)
    assert len(rows) <= 7


def test_too_long_example_is_refused_in_words(tiny_model_path, tiny_tokenizer, tmp_path):
    data = examples(2, answer="ok") + examples(1, answer="a much longer answer than the context allows " * 3)
    limit = max(len(e.input_ids) for e in tokenize_examples(tiny_tokenizer, data[:2], 1024))
    with pytest.raises(TrainingDataError, match=f"training example 3 is longer than the context of {limit} tokens"):
        train_lora(base_model_path=tiny_model_path, base_model_id="x", train_examples=data, output_dir=tmp_path,
                   hyperparameters={**HP, "max_seq_len": limit})


def test_unknown_target_module_is_refused(tiny_model_path, tmp_path):
    with pytest.raises(ValueError, match="qkv_proj"):
        train_lora(base_model_path=tiny_model_path, base_model_id="x", train_examples=examples(10),
                   output_dir=tmp_path, hyperparameters={**HP, "target_modules": ["q_proj", "qkv_proj"]})


def test_cancel_stops_within_a_step(tiny_model_path, tmp_path):
    calls = []
    result = train_lora(base_model_path=tiny_model_path, base_model_id="platform/tiny-chat",
                        train_examples=examples(50), output_dir=tmp_path, hyperparameters=HP,
                        should_cancel=lambda: calls.append(1) or len(calls) > 4)
    assert result.status == "cancelled" and result.adapter_dir is None
    assert result.steps == 4 and len(calls) == 5
    assert not (tmp_path / "adapter").exists()


def test_resume_continues_from_the_last_checkpoint(trained, tiny_model_path, tmp_path):
    kill_after = 13  # micro-batches: past the epoch-1 checkpoint (step 10), before epoch 2 ends
    calls = []
    first = train_lora(base_model_path=tiny_model_path, base_model_id="platform/tiny-chat",
                       train_examples=examples(50), valid_examples=examples(5, seed=1), output_dir=tmp_path,
                       hyperparameters=HP, should_cancel=lambda: calls.append(1) or len(calls) > kill_after)
    assert first.status == "cancelled" and first.steps == 13
    assert latest_checkpoint(tmp_path).name == "step-000010"
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))

    events = []
    second = train_lora(base_model_path=tiny_model_path, base_model_id="platform/tiny-chat",
                        train_examples=examples(50), valid_examples=examples(5, seed=1), output_dir=tmp_path,
                        hyperparameters=HP, on_event=events.append)
    assert second.status == "succeeded" and second.resumed_from_step == 10 and second.steps == 30
    assert [e["step"] for e in events if e["type"] == "metrics"][0] == 15
    reference, _ = trained
    assert second.trained_tokens == reference.trained_tokens
    assert second.train_loss == pytest.approx(reference.train_loss, rel=1e-4)
    assert second.valid_loss == pytest.approx(reference.valid_loss, rel=1e-4)


def test_resume_refuses_other_hyperparameters(tiny_model_path, tmp_path):
    calls = []
    train_lora(base_model_path=tiny_model_path, base_model_id="x", train_examples=examples(10), output_dir=tmp_path,
               hyperparameters={**HP, "n_epochs": 2}, should_cancel=lambda: calls.append(1) or len(calls) > 3)
    with pytest.raises(ValueError, match="other hyperparameters"):
        train_lora(base_model_path=tiny_model_path, base_model_id="x", train_examples=examples(10),
                   output_dir=tmp_path, hyperparameters={**HP, "n_epochs": 2, "learning_rate": 1e-3})


def test_learning_rate_schedule():
    linear, cosine = lr_lambda(10, 2, "linear"), lr_lambda(10, 2, "cosine")
    assert [linear(s) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert cosine(2) == 1.0 and cosine(6) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)


@pytest.mark.slow
def test_throughput_bench_smoke(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "train_throughput", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    out = tmp_path / "benchmarks.md"
    bench.main(["--tiny", "--docs-per-row", "3", "--out", str(out), "--tmp", str(tmp_path),
                "--variants", "baseline,ours,ours-packed4"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"trainer", "transformers Trainer + peft", "ours", "ours-packed4"}
    assert rows["ours"][0] == "3" and rows["ours-packed4"][0] == "4"  # documents per row
    assert float(rows["ours"][1].replace(",", "")) > 0 and float(rows["ours"][5]) > 0  # tokens/s, × baseline
    assert rows["transformers Trainer + peft"][5] == "1.00"


def test_chunked_loss_matches_the_whole_loss(tiny_model_path, tiny_tokenizer, monkeypatch):
    from finetune import trainer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    batch = collate(pack(tokenize_examples(tiny_tokenizer, examples(6), 1024), 100), 0, "cpu")

    def run():
        model.zero_grad()
        loss, n, correct = batch_loss(model, batch)
        loss.backward()
        return loss.item(), n, correct.item(), model.model.layers[0].mlp.up_proj.weight.grad.clone()

    whole = run()
    monkeypatch.setattr(trainer, "LOSS_CHUNK_ELEMENTS", 7 * model.lm_head.out_features)  # chunks of 7 tokens
    chunked = run()
    assert chunked[0] == pytest.approx(whole[0], rel=1e-5) and chunked[1:3] == whole[1:3]
    assert torch.allclose(chunked[3], whole[3], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_loss_and_gradients(tiny_model_path, tiny_tokenizer):
    """Regional compilation (an option for GPU workers) changes speed, not numbers. aot_eager traces and
    partitions exactly as inductor does, without its minute of C++ code generation on a CPU."""
    from finetune.trainer import Hyperparameters, compile_decoder_layers, load_lora_model

    batch = collate(pack(tokenize_examples(tiny_tokenizer, examples(6), 1024), 60), 0, "cpu")
    assert len(batch["input_ids"]) > 1 and (batch["position_ids"][:, 1:] == 0).any()  # packed rows
    results = []
    for compiled in (False, True):
        model = load_lora_model(tiny_model_path, Hyperparameters(lora_r=4), torch.device("cpu"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        if compiled:
            torch._dynamo.reset()
            compile_decoder_layers(model, backend="aot_eager")
        loss, n, correct = batch_loss(model, batch)
        (loss / n).backward()
        if compiled:  # the layers really ran compiled: two graphs whatever the depth, because only the first
            # layer's input (from the frozen embedding) needs no gradient; every later layer reuses the second
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
            assert all(layer._compiled_call_impl is not None for layer in model.get_base_model().model.layers)
        results.append((loss.item(), correct.item(),
                        {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (eager_loss, eager_correct, eager_grads), (loss, correct, grads) = results
    assert loss == pytest.approx(eager_loss, rel=1e-5) and correct == eager_correct
    assert grads.keys() == eager_grads.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads[k], eager_grads[k], rtol=1e-4, atol=1e-6)
