#!/usr/bin/env python
"""How fast the NIAH probe runs, against the ceiling of the same model: prefill tokens/s of the
probe and of a plain batched forward pass over the same lengths, in the same run, as a ratio.

Usage (one H200, a model folder with its tokenizer, e.g. SmolLM2-135M-Instruct)::

    python scripts/bench_eval.py --model DIR --lengths 1024,2048,4096,8192 --samples 100 \\
        --device cuda --dtype bfloat16 --out bench-out [--sweep-pre PRE --sweep-post POST]

Without ``--model`` it builds a tiny model (the demo's Qwen3-Next-style hybrid, with a word-level
tokenizer trained on the probe's own text so that it can read the prompts) and, without
``--sweep-pre/--sweep-post``, a drifted copy of it for the sweep: the CPU run of
docs/performance.md ("Evaluation speed").

What is timed (prompts are built and tokenised before the clock starts, as ``sweep`` builds them
once for every candidate):

* **probe**: ``Runner.niah_records`` per length and per scoring rule (``forced``: one teacher-forced
  pass; ``generate``: batched greedy generation), tokens = the prompts' and gold answers' tokens;
* **plain forward**: ``model(input_ids)`` on random ids of each length, ``samples`` sequences in the
  probe's batch size, logits at the last position only (what a prefill computes): the ceiling;
* **CLI**: a full ``qkrestore niah`` process (start-up, load, prompts, scoring), and with
  ``--sweep-pre/--sweep-post`` (or the tiny pair) a full default-candidate ``qkrestore sweep``.

Probe and plain pass run once untimed, then ``--repeats`` rounds interleaved; the median round of
each is reported (the generation throughput counts prompt tokens only: its decoding steps are the
price of reading the whole answer). Results go to OUT/bench_eval.json and OUT/bench_eval.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qkrestore.evaluate import niah as nh
from qkrestore.evaluate.runner import NiahSettings, Runner
from qkrestore.evaluate.scoring import plan_batches, token_budget
from qkrestore.io.runtime import load_causal_lm, load_tokenizer, quiet_transformers


def word_tokenizer() -> Any:
    """The demo's word-level tokenizer over the probe's text (digits stay unknown: tiny models
    answer nothing right, which costs the probe nothing)."""
    from qkrestore.testing.tiny import word_tokenizer as words

    return words()


def build_tiny(root: Path, context: int) -> tuple[Path, Path]:
    """The demo's tiny hybrid (qkrestore.testing.tiny) sized to the word tokenizer, PRE and POST."""
    from qkrestore.testing.tiny import QWEN3_NEXT, build_pair

    tok = word_tokenizer()
    kw = QWEN3_NEXT | {
        "vocab_size": len(tok),
        "max_position_embeddings": context,
        "pad_token_id": 3,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    pre, post = build_pair(root, "qwen3_next", kw, noise=0.005, shard=None)
    for d in (pre, post):
        tok.save_pretrained(d)
    return pre, post


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(runner: Runner, s: NiahSettings, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    built = runner.niah_prompts(s)  # built and cached before the clock starts
    build = time.perf_counter() - t0
    tokens = sum(len(b[3]) + len(b[4]) for b in built)
    sync(device)
    t0 = time.perf_counter()
    recs = runner.niah_records(s)
    sync(device)
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "tokens": tokens,
        "tokens_per_s": tokens / dt,
        "accuracy": sum(r["correct"] for r in recs) / len(recs),
        "prompt_build_seconds": build,
    }


def plain_forward(
    model: Any, length: int, samples: int, device: torch.device, vocab: int
) -> dict[str, Any]:
    """The ceiling: ``samples`` random sequences of ``length`` tokens in batches as large as the
    probe's token budget allows, logits at the last position only."""
    budget = token_budget(model, device, width=length)
    batches = list(plan_batches(range(samples), [length] * samples, None, samples, budget, 1 << 62))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (samples, length), generator=g)
    kwargs: dict[str, Any] = {"use_cache": False, "logits_to_keep": 1}
    with torch.inference_mode():
        model(input_ids=ids[: len(batches[0]), :64].to(device), **kwargs)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for b in batches:
            model(input_ids=ids[b].to(device), **kwargs)
        sync(device)
    dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "tokens": samples * length,
        "tokens_per_s": samples * length / dt,
        "batch_rows": len(batches[0]),
    }


def cli(args: list[str]) -> dict[str, Any]:
    """One ``qkrestore`` process, timed from start to exit."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "qkrestore", *args], capture_output=True, text=True, check=False
    )
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"qkrestore {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return {"command": "qkrestore " + " ".join(args), "seconds": dt, "doc": json.loads(r.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model folder with its tokenizer (default: tiny)")
    ap.add_argument("--lengths", default="256,512")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--task", default="single-2", choices=nh.TASKS)
    ap.add_argument("--scorings", default="forced,generate", help="probe rules to time")
    ap.add_argument("--sweep-pre", type=Path)
    ap.add_argument("--sweep-post", type=Path)
    ap.add_argument(
        "--threads", type=int, help="CPU threads for torch (1 is steadiest on a shared machine)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    ap.add_argument("--no-cli", action="store_true", help="skip the niah/sweep processes")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    quiet_transformers()
    if a.threads:
        torch.set_num_threads(a.threads)
    lengths = tuple(int(x) for x in a.lengths.split(","))
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype)
    model_dir, pre, post = a.model, a.sweep_pre, a.sweep_post
    if model_dir is None:
        pre_t, post_t = build_tiny(a.out / "tiny", max(lengths) + 64)
        model_dir = post_t
        if pre is None and post is None:
            pre, post = pre_t, post_t

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device=device, dtype=dtype)
    runner = Runner(model, tok, device, autocast=False, label=str(model_dir))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    rows = []
    scorings = a.scorings.split(",")
    for length in lengths:
        row: dict[str, Any] = {"length": length}
        settings = {
            sc: NiahSettings(lengths=(length,), task=a.task, samples=a.samples, scoring=sc)
            for sc in scorings
        }
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in ["plain", *scorings]}
        for rep in range(a.repeats + 1):  # interleaved; the first round warms up, untimed
            got = {"plain": plain_forward(model, length, a.samples, device, vocab)}
            for sc in scorings:
                got[sc] = probe(runner, settings[sc], device)
            if not rep:
                row["prompt_build_seconds"] = got[scorings[0]]["prompt_build_seconds"]
            if rep:
                for k, one in got.items():
                    runs[k].append(one)
        for k, rounds in runs.items():  # the median round by throughput
            row[k] = sorted(rounds, key=lambda x: x["tokens_per_s"])[len(rounds) // 2]
            row[k]["rounds_tokens_per_s"] = [round(x["tokens_per_s"], 1) for x in rounds]
        for sc in scorings:
            row[sc]["ratio"] = row[sc]["tokens_per_s"] / row["plain"]["tokens_per_s"]
        rows.append(row)

    def total(key: str) -> dict[str, float]:
        tok_n = sum(r[key]["tokens"] for r in rows)
        sec = sum(r[key]["seconds"] for r in rows)
        return {"tokens": tok_n, "seconds": sec, "tokens_per_s": tok_n / sec}

    summary: dict[str, Any] = {"plain": total("plain")}
    for scoring in a.scorings.split(","):
        summary[scoring] = total(scoring)
        summary[scoring]["ratio"] = (
            summary[scoring]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
        )
    attn = getattr(model.config, "_attn_implementation", None)
    del model, runner
    processes = {}
    if not a.no_cli:
        common = ["--lengths", a.lengths, "--samples", str(a.samples), "--device", a.device]
        if a.threads:  # the processes get the same CPU threads
            os.environ["OMP_NUM_THREADS"] = str(a.threads)
        processes["niah"] = cli(
            ["niah", str(model_dir), *common, "--dtype", a.dtype, "--task", a.task, "--json"]
        )
        if pre is not None and post is not None:
            processes["sweep"] = cli(
                ["sweep", str(pre), str(post), *common, "--task", a.task, "--json", "--quiet"]
            )
    doc = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "model": str(model_dir),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "dtype": a.dtype,
        "attn_implementation": attn,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "samples": a.samples,
        "task": a.task,
        "lengths": rows,
        "summary": summary,
        "processes": {
            k: {
                "command": v["command"],
                "seconds": v["seconds"],
                "inner_seconds": v["doc"].get("seconds")
                or sum(r["seconds"] for r in v["doc"].get("results", [])),
            }
            for k, v in processes.items()
        },
    }
    (a.out / "bench_eval.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [
        f"# bench_eval: {doc['model']} on {doc['device']} ({a.dtype}, {a.samples} samples/length)",
        "",
        f"`{doc['command']}`",
        "",
        "| length | prompts built (s) | plain fwd tok/s | batch rows |"
        + "".join(f" {s} tok/s | {s} ratio |" for s in a.scorings.split(",")),
        "|---:|---:|---:|---:|" + "---:|---:|" * len(a.scorings.split(",")),
    ]
    for r in rows:
        md.append(
            f"| {r['length']} | {r['prompt_build_seconds']:.2f} "
            f"| {r['plain']['tokens_per_s']:,.0f} | {r['plain']['batch_rows']} |"
            + "".join(
                f" {r[s]['tokens_per_s']:,.0f} | {r[s]['ratio']:.2f} |"
                for s in a.scorings.split(",")
            )
        )
    md.append(
        f"| all | {sum(r['prompt_build_seconds'] for r in rows):.2f} "
        f"| {summary['plain']['tokens_per_s']:,.0f} | |"
        + "".join(
            f" {summary[s]['tokens_per_s']:,.0f} | {summary[s]['ratio']:.2f} |"
            for s in a.scorings.split(",")
        )
    )
    for k, v in doc["processes"].items():
        md += ["", f"- `{v['command']}`: {v['seconds']:.1f} s wall ({k})"]
    (a.out / "bench_eval.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
