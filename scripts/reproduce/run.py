#!/usr/bin/env python
"""QK-Restore reproduction at small scale, end to end.

    python scripts/reproduce/run.py --out runs/toy --size toy      # CPU, < 1 min (CI)
    python scripts/reproduce/run.py --out runs/gpu --size gpu      # one H100, a few minutes

1. pre-train a small Qwen3.5-text hybrid on haystack documents (needle recall) + filler text;
2. CoT-SFT it on step-by-step running-sum traces (short, local Markov structure);
3. build +QK-Restore (`qkrestore merge`) and +QK-Pro (`qkrestore pro --fix key --ridge R`) with the
   real CLI on the saved checkpoints, and `qkrestore drift` PRE -> POST;
4. measure needle recall per context length and CoT accuracy for every model, write report.md,
   results.json and figures under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import data
import evaluate
import report
import train

REPO = Path(__file__).resolve().parents[2]

SIZES = {
    "toy": dict(
        vocab=dict(n_keys=32, n_vals=16, n_fill=32), pre_len=96, pre_batch=8, pre_steps=40,
        pre_lr=3e-3, pre_seconds=None, needles_per_1k=60.0, n_queries=2, plain_frac=0.2,
        sft_steps=30, sft_batch=32, sft_lr=1e-3, cot_digits=(3, 5), lengths=[48, 96],
        eval_docs=32, eval_batch=32, eval_problems=30, ridges=[0.1, 1.0], sft2_steps=20,
        sft2_seconds=None,
    ),
    "gpu": dict(
        vocab=dict(n_keys=64, n_vals=32, n_fill=64), pre_len=512, pre_batch=32, pre_steps=6000,
        pre_lr=1e-3, pre_seconds=190.0, needles_per_1k=32.0, n_queries=4, plain_frac=0.2,
        sft_steps=400, sft_batch=64, sft_lr=3e-4, cot_digits=(3, 8), lengths=[64, 128, 256, 512],
        eval_docs=128, eval_batch=64, eval_problems=240, ridges=[0.1, 1.0, 10.0], sft2_steps=1500,
        sft2_seconds=40.0,
    ),
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--size", choices=sorted(SIZES), default="toy")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pre-steps", type=int)
    ap.add_argument("--pre-seconds", type=float)
    ap.add_argument("--sft-steps", type=int)
    ap.add_argument("--sft-lr", type=float)
    ap.add_argument("--sft2-steps", type=int, help="steps of the longer, second SFT (0: none)")
    ap.add_argument("--ridges", type=lambda s: [float(x) for x in s.split(",")])
    args = ap.parse_args(argv)

    cfg = dict(SIZES[args.size])
    for k in ("pre_steps", "pre_seconds", "sft_steps", "sft_lr", "ridges", "sft2_steps"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out: Path = args.out
    ckpt = out / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    logf = open(out / "log.txt", "w")  # noqa: SIM115 (closed at the end; kept open for log())

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t_start = time.time()
    seed = args.seed
    vocab = data.Vocab(**cfg["vocab"])
    markov = data.Markov(vocab, seed=1234)
    commands = [
        " ".join(
            shlex.quote(a) for a in ["python", "scripts/reproduce/run.py", *(argv or sys.argv[1:])]
        )
    ]

    # 1. pre-training ------------------------------------------------------------------------
    model = train.build_model(vocab.size, args.size, seed).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    layer_types = list(model.config.layer_types)
    log(f"model: {n_params / 1e6:.2f} M params, layers {layer_types}, device {dev}")
    rng = np.random.default_rng(seed)
    n_needles = evaluate.n_needles_for(cfg["pre_len"], cfg["needles_per_1k"])

    def pre_batch(i: int):
        B, L = cfg["pre_batch"], cfg["pre_len"]
        n_plain = round(B * cfg["plain_frac"])
        hay, _ = data.haystack_batch(rng, markov, B - n_plain, L, n_needles, cfg["n_queries"])
        plain = data.plain_batch(rng, markov, n_plain, L, max(1, L // 128), cfg["cot_digits"][1])
        ids = torch.from_numpy(np.concatenate([hay, plain])).to(dev)
        return ids, ids

    pre_info = train.train(
        model, pre_batch, steps=cfg["pre_steps"], lr=cfg["pre_lr"], seconds=cfg["pre_seconds"],
        warmup=100, log=log, name="pretrain",
    )  # fmt: skip
    pre_info.update(
        batch=cfg["pre_batch"], length=cfg["pre_len"], lr=cfg["pre_lr"], needles=n_needles
    )
    model.save_pretrained(ckpt / "pre")

    # 2. CoT-SFT -----------------------------------------------------------------------------
    rng_sft = np.random.default_rng(seed + 1)

    def sft_batch(i: int):
        ids, labels = data.cot_batch(rng_sft, cfg["sft_batch"], *cfg["cot_digits"])
        return torch.from_numpy(ids).to(dev), torch.from_numpy(labels).to(dev)

    sft_info = train.train(
        model, sft_batch, steps=cfg["sft_steps"], lr=cfg["sft_lr"], warmup=20, log=log, name="sft"
    )
    sft_info.update(batch=cfg["sft_batch"], lr=cfg["sft_lr"], digits=list(cfg["cot_digits"]))
    model.save_pretrained(ckpt / "sft")
    sft2_info = None
    if cfg["sft2_steps"]:  # continue the same SFT for longer: does more SFT break recall more?
        sft2_info = train.train(
            model, sft_batch, steps=cfg["sft2_steps"], lr=cfg["sft_lr"], seconds=cfg["sft2_seconds"],
            warmup=20, log=log, name="sft-long",
        )  # fmt: skip
        sft2_info["total_sft_steps"] = sft_info["steps"] + sft2_info["steps"]
        model.save_pretrained(ckpt / "sft-long")
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # 3. surgery with the real CLI -----------------------------------------------------------
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])

    def cli(*a: str, capture: bool = False) -> str:
        cmd = [sys.executable, "-m", "qkrestore", *a]
        shown = "qkrestore " + " ".join(shlex.quote(x) for x in a)
        commands.append(shown)
        log("$ " + shown)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{shown} failed ({res.returncode}):\n{res.stderr[-3000:]}")
        return res.stdout

    pre, sft = str(ckpt / "pre"), str(ckpt / "sft")
    variants = {"PRE": pre, "+SFT": sft}
    cli("merge", pre, sft, "-o", str(ckpt / "qkrestore"), "--overwrite", "--quiet")
    variants["+QK-Restore"] = str(ckpt / "qkrestore")
    pro_dev = "cpu" if dev.type == "cpu" else "auto"
    for r in cfg["ridges"]:
        o = ckpt / f"qkpro-r{r:g}"
        cli("pro", pre, sft, "-o", str(o), "--fix", "key", "--ridge", f"{r:g}", "--device", pro_dev,
            "--overwrite", "--quiet")  # fmt: skip
        variants[f"+QK-Pro (R={r:g})"] = str(o)
    if sft2_info:
        long = str(ckpt / "sft-long")
        variants["+SFT-long"] = long
        cli("merge", pre, long, "-o", str(ckpt / "long-qkrestore"), "--overwrite", "--quiet")
        variants["+SFT-long +QK-Restore"] = str(ckpt / "long-qkrestore")
        cli("pro", pre, long, "-o", str(ckpt / "long-qkpro"), "--fix", "key", "--ridge", "1",
            "--device", pro_dev, "--overwrite", "--quiet")  # fmt: skip
        variants["+SFT-long +QK-Pro (R=1)"] = str(ckpt / "long-qkpro")
    drift = None
    try:
        drift = json.loads(
            cli("drift", pre, sft, "--json", "--plot", str(out / "drift.png"), capture=True)
        )
        (out / "drift.json").write_text(json.dumps(drift, indent=1))
    except (RuntimeError, json.JSONDecodeError) as exc:  # a diagnostic: report, do not fail the run
        log(f"drift failed: {exc}")

    # 4. evaluation ---------------------------------------------------------------------------
    from transformers import AutoModelForCausalLM

    def finish(models: dict) -> Path:
        results = {
            "size": args.size, "seed": seed, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "params": n_params, "layer_types": layer_types, "pretrain": pre_info, "sft": sft_info, "sft_long": sft2_info,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
            "models": models, "drift": drift, "commands": commands,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        }  # fmt: skip
        results["wall_seconds"] = time.time() - t_start
        report.plot(results, out / "recall.png")
        (out / "results.json").write_text(json.dumps(results, indent=1))
        path = report.write(
            results, out, "recall.png", "drift.png" if (out / "drift.png").exists() else None
        )
        return path

    models = {}
    for name, path in variants.items():
        t0 = time.time()
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        rec = evaluate.recall(
            m, markov, cfg["lengths"], n_docs=cfg["eval_docs"], batch=cfg["eval_batch"],
            needles_per_1k=cfg["needles_per_1k"], n_queries=cfg["n_queries"], seed=10_000 + seed,
            device=dev,
        )  # fmt: skip
        rea = evaluate.reasoning(
            m, n_problems=cfg["eval_problems"], n_min=cfg["cot_digits"][0],
            n_max=cfg["cot_digits"][1], seed=20_000 + seed, device=dev,
        )  # fmt: skip
        models[name] = {
            "recall": {str(k): v for k, v in rec.items()},
            "reasoning": rea,
            "path": path,
        }
        log(f"{name:22s} recall {[round(100 * v, 1) for v in rec.values()]} reasoning "
            f"{100 * rea['answer']:.1f}/{100 * rea['trace']:.1f} ({time.time() - t0:.0f}s)")  # fmt: skip
        del m
        finish(models)  # after every model, so a run cut short still leaves a report

    path = finish(models)
    log(f"report: {path} ({time.time() - t_start:.0f}s)")
    logf.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
