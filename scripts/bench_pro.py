#!/usr/bin/env python3
"""Time the QK-Pro solve (no file I/O) on model-shaped random problems.

Cases (all layers' attention of the model at once):

* ``9b``:  HypeNet-9B-shaped, 9 softmax-attention layers × 32 heads, 8 KV heads,
  d_h = 128, d = 4096.
* ``70b``: Llama-70B-shaped, 80 layers × 64 heads, 8 KV groups, d_h = 128, d = 8192.

For each case, each fix side (``key`` moves W_Q, ``query`` moves W_K), each
device (CPU float64; CUDA float32 when available) and each solve method, it
runs warm-up calls, then times ``--repeats`` calls (``torch.cuda.synchronize``
before and after each) and reports the median. Inputs are random bf16,
generated on the device (POST = PRE + noise). On CPU a case with more layers
than ``--cpu-max-layers`` is timed on that many layers and the full-model time
is extrapolated per layer; the table labels such rows "extrapolated".

Each GPU row also reports the relative difference of layer 0 against a float64
CPU solve of the same inputs, and the peak GPU memory of a call.

Usage::

    PYTHONPATH=src python3 scripts/bench_pro.py --out bench_pro.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from qkrestore.io.runtime import resolve_device
from qkrestore.qkpro.closed_form import solve


@dataclass(frozen=True)
class Case:
    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_h: int
    d: int


CASES = {
    "9b": Case("HypeNet-9B (9 attn layers)", 9, 32, 8, 128, 4096),
    "70b": Case("Llama-70B (80 layers)", 80, 64, 8, 128, 8192),
}


@dataclass
class Row:
    case: str
    fix: str
    device: str
    method: str
    compute_dtype: str
    layers_timed: int
    layers_total: int
    extrapolated: bool
    median_s: float
    total_s: float  # median_s, or median_s scaled to all layers when extrapolated
    per_layer_ms: float
    times_s: list[float] = field(default_factory=list)
    gflop: float = 0.0
    gflops_per_s: float = 0.0
    peak_mem_gib: float | None = None
    rel_err_layer0_vs_cpu_f64: float | None = None
    solver_calls: int | None = None  # torch.linalg.solve/inv calls in one run = layer chunks


def gflop(case: Case, fix: str, n_layers: int) -> float:
    """Rough floating-point work: Gram products plus the d_h × d_h solves with d columns."""
    dh2d = 2.0 * case.d_h * case.d_h * case.d
    if fix == "key":
        grams = case.n_kv_heads * dh2d
        solve = case.n_heads * dh2d  # forward + back substitution over d right-hand sides
    else:
        grams = case.n_heads * dh2d
        solve = case.n_kv_heads * dh2d
    return n_layers * (grams + solve) / 1e9


def make_inputs(case: Case, n_layers: int, device: torch.device, seed: int) -> dict:
    """Random bf16 weights on ``device``, POST = PRE + small noise, one stacked tensor each."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q_rows = case.n_heads * case.d_h
    k_rows = case.n_kv_heads * case.d_h

    def rand(rows: int) -> torch.Tensor:
        out = torch.empty((n_layers, rows, case.d), dtype=torch.bfloat16, device=device)
        for i in range(n_layers):  # layer by layer: no float32 copy of the whole model
            out[i] = torch.randn(
                (rows, case.d), generator=gen, device=device, dtype=torch.float32
            ).mul_(0.02)
        return out

    q_pre, k_pre = rand(q_rows), rand(k_rows)
    q_post, k_post = rand(q_rows), rand(k_rows)
    q_post.mul_(0.1).add_(q_pre)
    k_post.mul_(0.1).add_(k_pre)
    return {"q_pre": q_pre, "q_post": q_post, "k_pre": k_pre, "k_post": k_post}


def call_for(fix: str, inputs: dict, case: Case, ridge: float, device, method: str) -> Callable:
    if fix == "key":
        args = (inputs["q_pre"], inputs["q_post"], inputs["k_pre"])
        fn = partial(solve, "key")
    else:
        args = (inputs["k_pre"], inputs["k_post"], inputs["q_pre"])
        fn = partial(solve, "query")

    def run() -> torch.Tensor:
        return fn(*args, case.n_heads, case.n_kv_heads, ridge, device=device, method=method)

    return run


def count_solver_calls(run: Callable) -> int:
    """Run once, counting torch.linalg.solve / inv calls (one per chunk of layers)."""
    calls = 0
    originals = {name: getattr(torch.linalg, name) for name in ("solve", "inv")}

    def wrap(fn: Callable) -> Callable:
        def counted(*a, **k):
            nonlocal calls
            calls += 1
            return fn(*a, **k)

        return counted

    try:
        for name, fn in originals.items():
            setattr(torch.linalg, name, wrap(fn))
        out = run()
        del out
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)
    return calls


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(run: Callable, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        out = run()
        sync(device)
        del out
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = run()
        sync(device)
        times.append(time.perf_counter() - t0)
        del out  # never hold two results: the 70B one is 21 GB in float32
    return times


def layer0_error(
    fix: str, inputs: dict, case: Case, ridge: float, gpu_out0: torch.Tensor, method: str
) -> float:
    cpu_inputs = {k: v[:1].cpu() for k, v in inputs.items()}
    ref = call_for(fix, cpu_inputs, case, ridge, torch.device("cpu"), method)()[0]
    diff = gpu_out0.double().cpu() - ref
    return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(ref))


def bench_case(
    key: str, case: Case, device: torch.device, args: argparse.Namespace, methods: list[str]
) -> list[Row]:
    rows: list[Row] = []
    on_cpu = device.type == "cpu"
    n_layers = min(case.n_layers, args.cpu_max_layers) if on_cpu else case.n_layers
    if n_layers <= 0:
        return rows
    inputs = make_inputs(case, n_layers, device, args.seed)
    dtype = "float64" if on_cpu else "float32"
    for fix in args.fix:
        for method in methods:
            run = call_for(fix, inputs, case, args.ridge, device, method)
            if not on_cpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times = time_it(run, device, args.warmup, args.repeats)
            med = statistics.median(times)
            total = med * case.n_layers / n_layers
            work = gflop(case, fix, n_layers)
            row = Row(
                case=key,
                fix=fix,
                device=device.type,
                method=method,
                compute_dtype=dtype,
                layers_timed=n_layers,
                layers_total=case.n_layers,
                extrapolated=n_layers < case.n_layers,
                median_s=med,
                total_s=total,
                per_layer_ms=1e3 * med / n_layers,
                times_s=times,
                gflop=work,
                gflops_per_s=work / med,
            )
            row.solver_calls = count_solver_calls(run)
            if not on_cpu:
                row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
                if args.check:
                    out = run()
                    out0 = out[0].clone()
                    del out
                    row.rel_err_layer0_vs_cpu_f64 = layer0_error(
                        fix, inputs, case, args.ridge, out0, "solve"
                    )
            rows.append(row)
            print(
                f"  {key:>4} fix={fix:<5} {device.type:<4} {method:<7} {fmt_row(row)}", flush=True
            )
    del inputs
    if not on_cpu:
        torch.cuda.empty_cache()
    return rows


def fmt_row(row: Row) -> str:
    s = f"median {row.median_s:.4f} s over {row.layers_timed} layers"
    if row.extrapolated:
        s += f" -> {row.total_s:.2f} s for {row.layers_total} (extrapolated)"
    return s


def markdown(rows: list[Row], meta: dict) -> str:
    head = (
        "| case | fix | device | method | dtype | layers timed | median (s) | "
        "all layers (s) | per layer (ms) | GFLOP/s | solves | peak GPU GiB | rel. err vs f64 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        total = f"{r.total_s:.3f}" + (" (extrapolated)" if r.extrapolated else "")
        mem = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "–"
        err = (
            f"{r.rel_err_layer0_vs_cpu_f64:.1e}" if r.rel_err_layer0_vs_cpu_f64 is not None else "–"
        )
        lines.append(
            f"| {r.case} | {r.fix} | {r.device} | {r.method} | {r.compute_dtype} | "
            f"{r.layers_timed}/{r.layers_total} | {r.median_s:.4f} | {total} | "
            f"{r.per_layer_ms:.2f} | {r.gflops_per_s:.0f} | {r.solver_calls} | {mem} | {err} |"
        )
    foot = (
        f"\n{meta['gpu'] or 'no GPU'}; CPU: {meta['cpu_threads']} threads; torch "
        f"{meta['torch']}; ridge {meta['ridge']}; median of {meta['repeats']} runs after "
        f"{meta['warmup']} warm-up; {meta['date']}.\n"
    )
    return head + "\n".join(lines) + "\n" + foot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", help="write results as JSON here")
    p.add_argument("--cases", default="9b,70b", help="comma list of: " + ",".join(CASES))
    p.add_argument("--fix", default="key,query", help="comma list of: key,query")
    p.add_argument("--devices", default="auto", help="auto (cpu + cuda if present), cpu, cuda")
    p.add_argument("--gpu-methods", default="solve,inverse", help="methods timed on CUDA")
    p.add_argument("--cpu-methods", default="solve,inverse", help="methods timed on CPU")
    p.add_argument(
        "--cpu-max-layers",
        type=int,
        default=16,
        help="time CPU on at most N layers; larger cases are extrapolated per layer (0: skip)",
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--ridge", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", dest="check", action="store_false", help="skip accuracy check")
    p.add_argument("--date", default=_dt.date.today().isoformat(), help="date to record")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.fix = [f.strip() for f in args.fix.split(",") if f.strip()]
    if not set(args.fix) <= {"key", "query"}:
        p.error("--fix takes key and/or query")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}")

    if args.devices == "auto":
        devices = [torch.device("cpu")]
        if torch.cuda.is_available():
            devices.insert(0, torch.device("cuda"))
    else:
        try:
            devices = [resolve_device(d.strip()) for d in args.devices.split(",")]
        except ValueError as exc:
            p.error(str(exc))

    gpu_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    meta = {
        "date": args.date,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": gpu_name,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "ridge": args.ridge,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "cpu_max_layers": args.cpu_max_layers,
        "cases": {k: asdict(CASES[k]) for k in cases},
    }
    print(f"# bench_pro: torch {meta['torch']}, GPU {gpu_name}, {meta['cpu_threads']} CPU threads")
    rows: list[Row] = []

    def save() -> str:
        # Rewritten after every case, so a run cut short still leaves its numbers.
        table = markdown(rows, meta)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                payload = {"meta": meta, "rows": [asdict(r) for r in rows], "markdown": table}
                json.dump(payload, f, indent=2)
        return table

    for dev in devices:
        methods = args.gpu_methods if dev.type == "cuda" else args.cpu_methods
        methods = [m.strip() for m in methods.split(",") if m.strip()]
        for key in cases:
            rows.extend(bench_case(key, CASES[key], dev, args, methods))
            save()

    print()
    print(save())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
