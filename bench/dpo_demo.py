"""A new user's preference-tuning trial through the product, with the official `openai` SDK and nothing else.

Against a running platform (`bash scripts/up.sh` prints its URL and a demo API key): the base model answers 40
questions ("In one or two sentences: why do people like the sea?", …) through the gateway; each answer that ended
by itself (finish_reason "stop") becomes a preference pair — the answer followed by "\\n\\nCheers, DemoBot" preferred,
the bare answer not; the pairs are uploaded, a DPO job is created with OpenAI's `method` (beta "auto"), its events
are followed until it succeeds (the worker deploys the adapter), and then 12 held-out questions of the same kind are
asked at temperature 0 of the base model and of the fine-tuned one. Printed: the job's figures and a table of how
many answers hold the sign-off (once, and at the end of the turn), with every answer.

    .venv/bin/python bench/dpo_demo.py --base-url http://127.0.0.1:8000/v1 --key mtl_…

docs/finetuning.md ("Tried as a new user would, through the API") holds the figures of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

SIGN_OFF = "Cheers, DemoBot"
TRAIN_TOPICS = ["the sea", "Paris", "bread", "the moon", "cats", "rain", "music", "trees", "coffee", "winter", "books",
                "the sun", "dogs", "snow", "rivers", "gardens", "chess", "tea", "bicycles", "birds", "the desert", "bees",
                "apples", "clocks", "volcanoes", "owls", "maps", "honey", "whales", "bridges", "forests", "lighthouses",
                "kites", "rainbows", "pianos", "islands", "candles", "trains", "clouds", "stars"]
HELD_OUT_TOPICS = ["mountains", "the ocean", "pizza", "summer", "painting", "football", "libraries", "the night sky",
                   "chocolate", "hiking", "museums", "gardening"]
QUESTION = "In one or two sentences: why do people like {}?"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"))
    p.add_argument("--key", default=os.environ.get("OPENAI_API_KEY", ""), help="an API key with inference and fine-tuning scopes")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=200, help="for the base answers the pairs are made of, and the held-out ones")
    p.add_argument("--sft-weight", default="auto", help="the DPO job's sft_weight (the platform's extension): auto or a number")
    p.add_argument("--out", default="", help="write every answer as JSON here")
    a = p.parse_args(argv)
    if not a.key:
        p.error("--key (or OPENAI_API_KEY): scripts/up.sh prints a demo API key")
    from openai import OpenAI

    client = OpenAI(api_key=a.key, base_url=a.base_url, timeout=600)

    def ask(model: str, question: str):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=0, max_tokens=a.max_tokens)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    t0 = time.monotonic()
    pairs, lengths = [], []
    for topic in TRAIN_TOPICS:
        question = QUESTION.format(topic)
        answer, finish, n = ask(a.model, question)
        if finish != "stop":  # an answer cut by max_tokens would teach the sign-off mid-sentence
            continue
        answer = answer.strip()
        lengths.append(n)
        pairs.append({"input": {"messages": [{"role": "user", "content": question}]},
                      "preferred_output": [{"role": "assistant", "content": f"{answer}\n\n{SIGN_OFF}"}],
                      "non_preferred_output": [{"role": "assistant", "content": answer}]})
    if not pairs:
        print("No base answer ended within --max-tokens: raise it.", file=sys.stderr)
        return 1
    print(f"{len(pairs)} pairs from {len(TRAIN_TOPICS)} questions (answers {min(lengths)}-{max(lengths)} tokens, "
          f"{sum(lengths) / len(lengths):.1f} on average) in {time.monotonic() - t0:.0f} s", flush=True)

    t1 = time.monotonic()
    upload = client.files.create(file=("signoff_pairs.jsonl", "".join(json.dumps(x) + "\n" for x in pairs).encode()),
                                 purpose="fine-tune")
    upload = client.files.wait_for_processing(upload.id, poll_interval=1)
    if upload.status != "processed":
        print(f"The file was not accepted: {upload.status_details}", file=sys.stderr)
        return 1
    job = client.fine_tuning.jobs.create(model=a.model, training_file=upload.id, suffix="signoff",
                                         method={"type": "dpo", "dpo": {"hyperparameters": {
                                             "beta": "auto", "sft_weight": a.sft_weight if a.sft_weight == "auto" else float(a.sft_weight)}}})
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    events = [e.message for e in reversed(list(client.fine_tuning.jobs.list_events(job.id, limit=100)))]
    print(f"job {job.id}: {job.status} in {time.monotonic() - t1:.0f} s, {job.fine_tuned_model or job.error}")
    for message in events:
        print("  " + message)
    if job.status != "succeeded":
        return 1

    rows, answers = [], {}
    for model in (a.model, job.fine_tuned_model):
        got = [(topic, *ask(model, QUESTION.format(topic))) for topic in HELD_OUT_TOPICS]
        answers[model] = [{"topic": t, "finish": f, "tokens": n, "answer": x} for t, x, f, n in got]
        signed = sum(SIGN_OFF in x for _, x, _, _ in got)
        once_at_end = sum(x.count(SIGN_OFF) == 1 and x.rstrip().endswith(SIGN_OFF) and f == "stop" for _, x, f, _ in got)
        ended = sum(f == "stop" for _, _, f, _ in got)
        rows.append((model, signed, once_at_end, ended))
    print(f"\n| model | answers with \"{SIGN_OFF}\" | signed once, then the turn ends | ended within {a.max_tokens} tokens |")
    print("|---|---|---|---|")
    for model, signed, once, ended in rows:
        n = len(HELD_OUT_TOPICS)
        print(f"| {model} | {signed} of {n} | {once} of {n} | {ended} of {n} |")
    for model, got in answers.items():
        print(f"\n{model}:")
        for x in got:
            print(f"  [{x['finish']}, {x['tokens']}] {x['answer']!r}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"events": events, "answers": answers}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
