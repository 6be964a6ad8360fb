#!/usr/bin/env python3
"""Time ``qkrestore merge`` on a PEFT LoRA adapter against a plain copy of PRE's files.

Builds (in ``WORKDIR``, deleted at the end unless ``--keep``) a synthetic Qwen3.5-9B-shaped base
with ``scripts/make_synthetic_checkpoint.py`` (``--size``, default 8GB; its POST is deleted at once)
and a PEFT LoRA adapter on it (``--rank`` 64, bf16, on ``q_proj,k_proj,v_proj,o_proj``; with
``--all-linear`` also on every MLP and linear-attention projection). Then, in alternating rounds,
each in a fresh child process timed from spawn to exit, with its peak RSS from ``os.wait4``:

* ``copy``: a plain copy of every file of PRE (``shutil.copyfile``): the floor for writing a model;
* ``model``: ``qkrestore merge PRE ADAPTER -o OUT --merge-adapter`` (a full merged checkpoint);
* ``adapter``: ``qkrestore merge PRE ADAPTER -o OUT`` (an adapter out);
* ``startup``: ``qkrestore --version``, the import cost every run pays.

Cold cache: before every run the files of PRE and of the adapter are synced and evicted from the
page cache with ``posix_fadvise(DONTNEED)`` (only our own files: the system-wide cache is left
alone). Outputs are deleted after each run, outside the timing. Reports the ratios to ``copy`` in the
same run and the adapter's bytes in vs out.

Usage::

    python scripts/bench_adapter.py /tmp/qkbench/adapter --rounds 3 --markdown results.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COPY_CODE = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for fn in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, fn), os.path.join(dst, fn))
"""
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = (
    *QKVO,
    "gate_proj",
    "up_proj",
    "down_proj",
    "in_proj_qkv",
    "in_proj_z",
    "out_proj",
)


def evict(root: Path) -> None:
    """Drop our own files from the page cache (clean pages only, hence the sync first)."""
    os.sync()
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_child(cmd: list[str], log: Path) -> tuple[float, int, int]:
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return wall, usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)


def make_adapter(pre: Path, out: Path, rank: int, targets: tuple[str, ...]) -> dict:
    """A PEFT LoRA adapter on PRE's linear weights whose module name ends in one of ``targets``.

    Runs in a child process (``--make-adapter``): a parent that imported torch would hand its
    resident memory to every forked child, and ``ru_maxrss`` would report that, not the child's.
    """
    import torch
    from safetensors.torch import save_file

    index = json.loads((pre / "model.safetensors.index.json").read_text())
    from qkrestore.io.checkpoint import Checkpoint

    ck = Checkpoint.open(pre)
    g = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    modules = 0
    for name in sorted(index["weight_map"]):
        module = name.removesuffix(".weight")
        info = ck.tensors[name]
        if not name.endswith(".weight") or len(info.shape) != 2:
            continue
        if module.rsplit(".", 1)[-1] not in targets or "embed" in module or "lm_head" in module:
            continue
        rows, cols = info.shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) * 0.01).bfloat16()
        tensors[f"{key}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.01).bfloat16()
        modules += 1
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
        "bias": "none",
        "use_dora": False,
        "use_rslora": False,
        "task_type": "CAUSAL_LM",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return {"modules": modules, "bytes": (out / "adapter_model.safetensors").stat().st_size}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--size", default="8GB")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--all-linear", action="store_true", help="also MLP and linear-attention")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep WORKDIR")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--markdown", type=Path, help="write a results table here")
    ap.add_argument(
        "--make-adapter", nargs=3, metavar=("PRE", "OUT", "TARGETS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    if args.make_adapter:
        pre_dir, out_dir, names = args.make_adapter
        made = make_adapter(Path(pre_dir), Path(out_dir), args.rank, tuple(names.split(",")))
        print(json.dumps(made))
        return 0

    work: Path = args.workdir
    if work.exists():
        ap.error(f"{work} exists")
    qk = [sys.executable, "-m", "qkrestore"]
    try:
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_synthetic_checkpoint.py"),
                str(work / "pair"),
                "--preset",
                "qwen3.5-9b",
                "--size",
                args.size,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        shutil.rmtree(work / "pair" / "post")  # only the base is needed
        pre = work / "pair" / "pre"
        adapter = work / "adapter"
        targets = ALL_LINEAR if args.all_linear else QKVO
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                str(work),
                "--rank",
                str(args.rank),
                "--make-adapter",
                str(pre),
                str(adapter),
                ",".join(targets),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        made = json.loads(child.stdout)
        pre_bytes = sum(p.stat().st_size for p in pre.iterdir())
        print(
            f"base {pre_bytes / 1e9:.2f} GB; adapter r={args.rank} on {made['modules']} modules, "
            f"{made['bytes'] / 1e6:.1f} MB (built in {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        methods = {
            "copy": [sys.executable, "-c", COPY_CODE, str(pre), "{out}"],
            "model": [
                *qk,
                "merge",
                str(pre),
                str(adapter),
                "-o",
                "{out}",
                "--merge-adapter",
                "--quiet",
                "--json",
            ],
            "adapter": [*qk, "merge", str(pre), str(adapter), "-o", "{out}", "--quiet", "--json"],
            "startup": [*qk, "--version"],
        }
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        adapter_out = None
        for rnd in range(args.rounds):
            for name, cmd in methods.items():
                out = work / f"out-{name}"
                evict(pre)
                evict(adapter)
                wall, rss, rc = run_child(
                    [c.replace("{out}", str(out)) for c in cmd], work / f"{name}.log"
                )
                if rc != 0:
                    print((work / f"{name}.log").read_text()[-2000:], file=sys.stderr)
                    raise SystemExit(f"{name} failed with exit code {rc}")
                run = {"seconds": wall, "peak_rss": rss}
                if name in ("model", "adapter"):
                    # The job's own time, from its --json summary (start-up and imports excluded).
                    log = (work / f"{name}.log").read_text()
                    run["job_seconds"] = json.loads(log[log.index("{") :])["seconds"]
                if name == "adapter" and adapter_out is None:
                    adapter_out = (out / "adapter_model.safetensors").stat().st_size
                runs[name].append(run)
                print(
                    f"round {rnd + 1} {name:8s} {wall:7.2f} s  {rss / 2**20:7.0f} MiB", flush=True
                )
                if out.exists():
                    shutil.rmtree(out)
                os.sync()
        summary = {}
        base = statistics.median(r["seconds"] for r in runs["copy"])
        for name, rs in runs.items():
            med = statistics.median(r["seconds"] for r in rs)
            summary[name] = {
                "median_s": round(med, 3),
                "ratio_to_copy": round(med / base, 3),
                "peak_rss_mib": round(max(r["peak_rss"] for r in rs) / 2**20),
            }
            if "job_seconds" in rs[0]:
                summary[name]["job_median_s"] = statistics.median(r["job_seconds"] for r in rs)
        doc = {
            "base_bytes": pre_bytes,
            "adapter": {"rank": args.rank, "targets": list(targets), **made},
            "adapter_bytes_in": made["bytes"],
            "adapter_bytes_out": adapter_out,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "summary": summary,
            "runs": runs,
        }
        print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=2))
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
        if args.markdown:
            lines = [
                f"base {pre_bytes / 1e9:.2f} GB (Qwen3.5-9B-shaped, bf16); adapter r={args.rank} "
                f"on {made['modules']} modules: {made['bytes'] / 1e6:.2f} MB in, "
                f"{(adapter_out or 0) / 1e6:.2f} MB out; {args.rounds} rounds, cold cache",
                "",
                "| run | median s | × copy | job's own s | peak RSS MiB |",
                "|---|---|---|---|---|",
            ]
            for name, s in summary.items():
                lines.append(
                    f"| {name} | {s['median_s']} | {s['ratio_to_copy']} | "
                    f"{s.get('job_median_s', '')} | {s['peak_rss_mib']} |"
                )
            args.markdown.write_text("\n".join(lines) + "\n")
    finally:
        if not args.keep and work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
