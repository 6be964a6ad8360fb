"""Is the distilled hybrid a real hybrid? Perplexity against the teacher, NIAH, and where recall lives.

1. **Perplexity** of teacher and hybrid on held-out package text (the files distill.py never trains
   on: the same hash split), in windows of ``--ppl-len`` tokens, plus the per-token KL between them.
2. **NIAH** through the real ``qkrestore niah`` CLI (``--json``) at ``--lengths``, for the teacher,
   the hybrid and the hybrid with routing ablated:

   * ``full-wq``: the query rows of every softmax layer's ``q_proj`` zeroed (gate rows kept), so
     those layers attend uniformly;
   * ``linear-q-one``: one DeltaNet layer's query rows of ``in_proj_qkv`` zeroed;
   * ``linear-q-matched``: as many DeltaNet layers' query rows zeroed as there are softmax layers
     (the layer just before each softmax layer), so the two ablations remove the same count.

   If recall runs through the softmax layers, ``full-wq`` drops it and the linear ablations much less.

Writes ``check.json`` and ``check.md`` to OUT. Run:
``python scripts/hybrid/check.py TEACHER HYBRID OUT [--lengths 1024,2048,4096,8192 --samples 10]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import build_corpus

# -- ablations (pure: a state dict and a config in, the zeroed tensors out) -----------------------


def full_layers(cfg: dict[str, Any]) -> list[int]:
    return [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"]


def linear_layers(cfg: dict[str, Any]) -> list[int]:
    return [i for i, t in enumerate(cfg["layer_types"]) if t == "linear_attention"]


def zero_full_wq(
    state: dict[str, torch.Tensor], cfg: dict[str, Any], layers: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Zero the query rows (not the gate rows) of the given softmax layers' gated q_proj."""
    heads, hd = cfg["num_attention_heads"], cfg["head_dim"]
    out = {}
    for i in layers:
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        w = state[name].clone().view(heads, 2 * hd, -1)
        w[:, :hd] = 0
        out[name] = w.view(2 * heads * hd, -1)
    return out


def zero_linear_q(
    state: dict[str, torch.Tensor], cfg: dict[str, Any], layers: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Zero the query rows (the first key_dim rows) of the given DeltaNet layers' in_proj_qkv."""
    key_dim = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    out = {}
    for i in layers:
        name = f"model.layers.{i}.linear_attn.in_proj_qkv.weight"
        w = state[name].clone()
        w[:key_dim] = 0
        out[name] = w
    return out


def ablation_plan(
    cfg: dict[str, Any], one_linear: int | None = None
) -> dict[str, tuple[str, list[int]]]:
    """name → (kind, layers). The matched set is the DeltaNet layer before each softmax layer."""
    full, lin = full_layers(cfg), linear_layers(cfg)
    before = [i - 1 for i in full if i - 1 in lin]
    one = one_linear if one_linear is not None else lin[len(lin) // 2]
    return {
        "full-wq": ("full", full),
        "linear-q-one": ("linear", [one]),
        "linear-q-matched": ("linear", before),
    }


def write_ablated(src: Path, dst: Path, changed: dict[str, torch.Tensor]) -> None:
    """A copy of ``src`` whose weights differ only in ``changed`` (side files copied)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
            tensors = {n: changed.get(n, fh.get_tensor(n)) for n in fh.keys()}  # noqa: SIM118
        save_file(tensors, str(dst / f.name), metadata=meta)


# -- measurements -------------------------------------------------------------------------------


@torch.no_grad()
def perplexities(
    teacher: Any,
    student: Any,
    stream: torch.Tensor,
    seq_len: int,
    device: torch.device,
) -> dict[str, float]:
    """Token-level perplexity of both models and mean KL(teacher ‖ student) over the same windows."""
    n = stream.numel() // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    nll_t = nll_s = kl = 0.0
    count = 0
    for w in windows:
        ids = w.unsqueeze(0).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lt = teacher(input_ids=ids).logits.float()[0, :-1]
            ls = student(input_ids=ids).logits.float()[0, :-1]
        y = ids[0, 1:]
        pt, ps = F.log_softmax(lt, -1), F.log_softmax(ls, -1)
        nll_t += float(F.nll_loss(pt, y, reduction="sum"))
        nll_s += float(F.nll_loss(ps, y, reduction="sum"))
        kl += float((pt.exp() * (pt - ps)).sum())
        count += y.numel()
    return {
        "tokens": count,
        "windows": n,
        "ppl_teacher": math.exp(nll_t / count),
        "ppl_hybrid": math.exp(nll_s / count),
        "kl_per_token": kl / count,
    }


def run_niah(
    model: Path, lengths: str, task: str, samples: int, device: str, chat: bool
) -> dict[str, Any]:
    """``qkrestore niah --json`` as a user would run it; its JSON document."""
    cmd = [
        sys.executable, "-m", "qkrestore", "niah", str(model), "--lengths", lengths, "--task", task,
        "--samples", str(samples), "--device", device, "--json",
    ]  # fmt: skip
    if chat:
        cmd.append("--chat-template")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if res.returncode != 0:
        raise RuntimeError(f"qkrestore niah {model} failed: {res.stderr.strip()[-2000:]}")
    doc = json.loads(res.stdout)
    doc["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return doc


def markdown(report: dict[str, Any]) -> str:
    p = report["perplexity"]
    lines = [
        "| model | held-out ppl |",
        "|---|---|",
        f"| teacher (SmolLM2) | {p['ppl_teacher']:.3f} |",
        f"| hybrid | {p['ppl_hybrid']:.3f} |",
        "",
        f"KL(teacher ‖ hybrid) = {p['kl_per_token']:.4f} nats/token over {p['tokens']} held-out tokens.",
        "",
    ]
    niah = report.get("niah", {})
    if niah:
        lengths = report["lengths"]
        lines += [
            f"NIAH {report['task']}, {report['samples']} samples per length (accuracy %):",
            "",
            "| model | " + " | ".join(str(n) for n in lengths) + " |",
            "|---|" + "---|" * len(lengths),
        ]
        for name, doc in niah.items():
            acc = {r["length"]: r["accuracy"] for r in doc["results"]}
            cells = [f"{100 * acc[n]:.0f}" if acc.get(n) is not None else "-" for n in lengths]
            layers = report["ablations"].get(name, {}).get("layers")
            label = f"{name} (layers {','.join(map(str, layers))})" if layers else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qkrestore.io.runtime import quiet_transformers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", type=Path)
    ap.add_argument("hybrid", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--task", default="single-2", choices=["single-1", "single-2", "single-3"])
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--no-chat-template", action="store_true")
    ap.add_argument("--ppl-tokens", type=int, default=65536)
    ap.add_argument("--ppl-len", type=int, default=2048)
    ap.add_argument("--skip-teacher-niah", action="store_true")
    ap.add_argument("--skip-niah", action="store_true")
    ap.add_argument("--one-linear", type=int, default=None, help="layer for linear-q-one")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args(argv)

    quiet_transformers()
    a.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(
        "cuda"
        if a.device == "auto" and torch.cuda.is_available()
        else ("cpu" if a.device == "auto" else a.device)
    )
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.teacher)
    corpus = build_corpus(tok, train_tokens=0, held_out_tokens=a.ppl_tokens)
    teacher: Any = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.float32)
    student: Any = AutoModelForCausalLM.from_pretrained(a.hybrid, dtype=torch.float32)
    teacher.to(device).eval()
    student.to(device).eval()
    report: dict[str, Any] = {
        "teacher": str(a.teacher),
        "hybrid": str(a.hybrid),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "corpus": corpus.record,
        "perplexity": perplexities(teacher, student, corpus.held_out, a.ppl_len, device),
        "lengths": [int(x) for x in a.lengths.split(",")],
        "task": a.task,
        "samples": a.samples,
        "ablations": {},
        "niah": {},
    }
    del teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = json.loads((a.hybrid / "config.json").read_text())
    if not a.skip_niah:
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for f in sorted(a.hybrid.glob("*.safetensors")):
            state.update(load_file(str(f)))
        dev = "cuda" if device.type == "cuda" else "cpu"
        chat = not a.no_chat_template
        if not a.skip_teacher_niah:
            report["niah"]["teacher"] = run_niah(a.teacher, a.lengths, a.task, a.samples, dev, chat)
        report["niah"]["hybrid"] = run_niah(a.hybrid, a.lengths, a.task, a.samples, dev, chat)
        work = a.out / "ablated"
        for name, (kind, layers) in ablation_plan(cfg, a.one_linear).items():
            zero = zero_full_wq if kind == "full" else zero_linear_q
            folder = work / name
            write_ablated(a.hybrid, folder, zero(state, cfg, layers))
            report["ablations"][name] = {"kind": kind, "layers": layers}
            report["niah"][name] = run_niah(folder, a.lengths, a.task, a.samples, dev, chat)
            shutil.rmtree(folder)
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (a.out / "check.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "check.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
