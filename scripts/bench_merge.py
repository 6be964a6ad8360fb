#!/usr/bin/env python3
"""Time ``qkrestore merge`` against a plain copy of POST and against mergekit, on one PRE/POST pair.

Methods (``--methods``, run in this order in every round, so runs alternate A B C A B C ...):

* ``copy``: a plain copy of every file of POST (``shutil.copyfile`` per file) in a child process;
  the floor any tool that writes a full output must pay.
* ``startup``: ``qkrestore --version``: the interpreter and import cost every qkrestore run pays.
* ``merge``: ``qkrestore merge PRE POST -o OUT --json --quiet`` (``-j`` from ``--jobs`` if given).
* ``merge-j1``: the same with ``--jobs 1`` (to compare with the default of 2 parallel copies).
* ``link``: ``qkrestore merge --link`` (untouched shards hard-linked to POST's files).
* ``merge-b``, ``link-b``: ``merge`` and ``link`` run by a second qkrestore executable
  (``--qkrestore-b``), to A/B a change to qkrestore in the same alternating rounds.
* ``mergekit``: ``mergekit-yaml`` 0.1.x on the equivalent job, where installed: a ``linear`` merge
  whose per-tensor ``filter`` weights give PRE 1.0 on the tensors qkrestore's plan restores and
  POST 1.0 everywhere else. mergekit cannot take a subset of rows, so on a gated ``q_proj``
  (Qwen3-Next / Qwen3.5) it takes the whole tensor (query *and* gate rows) from PRE: its job is
  that superset, which is as close as mergekit can express.

Every run is a fresh child process, timed from spawn to exit; its peak RSS is the child's own
``ru_maxrss`` from ``os.wait4`` (which includes any children it waited for). Each output is deleted
right after its run, then ``sync`` is called and the run waits (``--settle``) until the kernel's
dirty pages have been written back, outside the timing. By default the page cache is not dropped:
PRE and POST are read once up front (``--warmup``) so that every method starts from a warm cache.

``--cold`` drops the page cache (``echo 3 > /proc/sys/vm/drop_caches``, root only) before every run
instead, so each method reads its inputs from disk. ``--to-disk`` times each run until its bytes are
on disk: after the child exits, every file and folder of the output and the output's parent are
fsynced, and that flush is part of the run's time (``flush_s`` records it alone; ``return_s`` is
when the child returned). A method that already fsyncs (qkrestore since issue 14) flushes almost
nothing there; one that does not (a plain copy, an older qkrestore as ``merge-b``) pays it there.

qkrestore's own accounting is reported too: ``bytes_read_from_pre`` (bytes read with pread from
PRE) against ``restored_bytes`` (the bytes of the restored rows).

Usage::

    python scripts/bench_merge.py /tmp/qkbench/pair-4g/pre /tmp/qkbench/pair-4g/post \\
        --rounds 3 --out results.json --markdown results.md
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = {
    "startup": "qkrestore --version (start-up only)",
    "copy": "plain copy of POST (shutil.copyfile)",
    "merge": "qkrestore merge",
    "merge-j1": "qkrestore merge --jobs 1",
    "link": "qkrestore merge --link",
    "mergekit": "mergekit-yaml (linear, per-tensor filters)",
    "merge-b": "qkrestore merge (build B)",
    "link-b": "qkrestore merge --link (build B)",
}
ALL_METHODS = tuple(LABELS)
QK_METHODS = ("merge", "merge-j1", "link", "merge-b", "link-b")

COPY_CODE = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
for dirpath, dirnames, filenames in os.walk(src):
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    rel = os.path.relpath(dirpath, src)
    os.makedirs(os.path.join(dst, rel), exist_ok=True)
    for fn in filenames:
        shutil.copyfile(os.path.join(dirpath, fn), os.path.join(dst, rel, fn))
"""


# -- helpers --------------------------------------------------------------------------------------


def find_tool(name: str, explicit: str | None, extra_dirs: tuple[str, ...] = ()) -> str | None:
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for d in (*extra_dirs, os.path.dirname(sys.executable)):
        cand = os.path.join(d, name)
        if os.access(cand, os.X_OK):
            return cand
    return shutil.which(name)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def read_through(root: Path) -> None:
    """Read every file once so that the page cache holds it (the cache cannot be dropped here)."""
    buf = bytearray(16 * 2**20)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def run_child(cmd: list[str], log: Path) -> tuple[float, int, int]:
    """Run ``cmd`` with stdout+stderr to ``log``; (wall seconds, peak RSS bytes, exit status)."""
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode  # ru_maxrss is in KiB on Linux


def dirty_bytes() -> int:
    with open("/proc/meminfo") as fh:
        return sum(
            int(line.split()[1]) * 1024 for line in fh if line.startswith(("Dirty:", "Writeback:"))
        )


def settle(seconds: float) -> None:
    """``sync``, wait for write-back to drain (at most 60 s), then ``seconds`` more."""
    os.sync()
    deadline = time.monotonic() + 60
    try:
        while dirty_bytes() > 64 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.2)
    except OSError:
        pass
    time.sleep(seconds)


def drop_caches() -> None:
    """Write dirty pages back, then drop the clean page cache, dentries and inodes (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


def flush_tree(root: Path) -> float:
    """fsync every file and folder under ``root`` and its parent; seconds taken."""
    t0 = time.perf_counter()
    if root.exists():
        for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
            for fn in filenames:
                fd = os.open(os.path.join(dirpath, fn), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    # qkrestore stages into hidden siblings; a failed run may leave none, but check anyway.
    for stray in path.parent.glob(f".{path.name}.qkrestore-*"):
        shutil.rmtree(stray, ignore_errors=True)


def mergekit_yaml(pre: Path, post: Path, routing: list[str]) -> str:
    """A linear merge: weight 1.0 on PRE for ``routing`` tensors, 1.0 on POST for all others.

    mergekit's ``filter`` is a substring test on the tensor name; each filter is a full tensor name,
    which is a substring of no other name here. The first matching filter wins.
    """

    def weights(on_routing: float, elsewhere: float) -> str:
        lines = [f'        - filter: "{name}"\n          value: {on_routing}' for name in routing]
        lines.append(f"        - value: {elsewhere}")
        return "\n".join(lines)

    return (
        "# Generated by scripts/bench_merge.py: the mergekit form of qkrestore's plan.\n"
        "merge_method: linear\n"
        "dtype: bfloat16\n"
        "parameters:\n"
        "  normalize: false\n"
        "models:\n"
        f'  - model: "{pre}"\n'
        "    parameters:\n"
        "      weight:\n"
        f"{weights(1.0, 0.0)}\n"
        f'  - model: "{post}"\n'
        "    parameters:\n"
        "      weight:\n"
        f"{weights(0.0, 1.0)}\n"
    )


def machine() -> dict:
    mem = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}" if unit == "GB" else f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


# -- the benchmark --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Methods: "
        + "; ".join(f"{k}: {v}" for k, v in LABELS.items())
        + ". Outputs go to --work (same file system as POST, for --link).",
    )
    ap.add_argument("pre", type=Path, help="PRE checkpoint folder")
    ap.add_argument("post", type=Path, help="POST checkpoint folder")
    ap.add_argument("--work", type=Path, help="folder for outputs (default: POST's parent)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all methods (3)")
    ap.add_argument(
        "--methods",
        default="startup,copy,merge,link,mergekit",
        help=f"comma list of {','.join(ALL_METHODS)} (default startup,copy,merge,link,mergekit)",
    )
    ap.add_argument("--jobs", type=int, help="qkrestore --jobs for merge/link (tool default)")
    ap.add_argument(
        "--merge-args",
        default="",
        help="extra options for every qkrestore merge, e.g. '--layers 3' (same restored set "
        "on pairs of different sizes)",
    )
    ap.add_argument("--mergekit-rounds", type=int, help="rounds that include mergekit (all)")
    ap.add_argument("--qkrestore", help="qkrestore executable (next to this Python, or PATH)")
    ap.add_argument("--qkrestore-b", help="a second qkrestore executable, for merge-b and link-b")
    ap.add_argument(
        "--mergekit", help="mergekit-yaml executable (default: PATH, then /tmp/mkvenv/bin)"
    )
    ap.add_argument(
        "--mergekit-args",
        default="--no-copy-tokenizer --quiet",
        help="extra mergekit-yaml options (default: --no-copy-tokenizer --quiet)",
    )
    ap.add_argument("--no-warmup", action="store_true", help="skip reading PRE/POST up front")
    ap.add_argument("--no-sync", action="store_true", help="skip sync after deleting an output")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait after each sync (2)")
    ap.add_argument(
        "--cold", action="store_true", help="drop the page cache before every run (root)"
    )
    ap.add_argument(
        "--to-disk",
        action="store_true",
        help="time each run until its output is fsynced (flush included in the time)",
    )
    ap.add_argument("--label", default="", help="a name for this pair in the tables")
    ap.add_argument("--out", type=Path, help="write results as JSON here")
    ap.add_argument("--markdown", type=Path, help="write the table as markdown here")
    args = ap.parse_args(argv)

    pre, post = args.pre.resolve(), args.post.resolve()
    work = (args.work or post.parent).resolve()
    work.mkdir(parents=True, exist_ok=True)
    qk = find_tool("qkrestore", args.qkrestore)
    if qk is None:
        ap.error("qkrestore not found (pass --qkrestore)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        ap.error(f"unknown methods: {sorted(unknown)}")
    if {"merge-b", "link-b"} & set(methods) and not args.qkrestore_b:
        ap.error("merge-b and link-b need --qkrestore-b")
    mk = None
    if "mergekit" in methods:
        mk = find_tool("mergekit-yaml", args.mergekit, ("/tmp/mkvenv/bin",))
        if mk is None:
            print("mergekit-yaml not found: skipping the mergekit method", file=sys.stderr)
            methods.remove("mergekit")

    # The plan, once: which tensors (for mergekit) and which shards it touches.
    extra = args.merge_args.split()
    dry = subprocess.run(
        [
            qk,
            "merge",
            str(pre),
            str(post),
            "-o",
            str(work / "dry-run"),
            "--dry-run",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    plan = json.loads(dry.stdout)
    routing = [t["name"] for t in plan["plan"]["tensors"]]
    routing_whole_bytes = 0
    for t in plan["plan"]["tensors"]:
        n = 2 if t["dtype"] in ("BF16", "F16") else 4
        for d in t["shape"]:
            n *= d
        routing_whole_bytes += n
    with open(post / "model.safetensors.index.json") as fh:
        shards = sorted(set(json.load(fh)["weight_map"].values()))
    pair = {
        "label": args.label,
        "pre": str(pre),
        "post": str(post),
        "post_bytes": tree_bytes(post),
        "shards": len(shards),
        "touched_shards": len(plan["touched_files"]),
        "layers": plan["layers"],
        "restored_tensors": len(routing),
        "restored_bytes": plan["restored_bytes"],
        "mergekit_pre_tensor_bytes": routing_whole_bytes,
        "model_type": plan["plan"].get("model_type"),
    }
    mk_cfg = work / "mergekit-qkrestore.yaml"
    if mk:
        mk_cfg.write_text(mergekit_yaml(pre, post, routing))

    print(
        f"pair: {fmt_bytes(pair['post_bytes'])} POST in {pair['shards']} shards, "
        f"{pair['restored_tensors']} tensors restored ({fmt_bytes(pair['restored_bytes'])}) "
        f"in {pair['touched_shards']} shard(s); methods {methods}, {args.rounds} rounds",
        file=sys.stderr,
    )
    if not args.no_warmup and not args.cold:
        t0 = time.perf_counter()
        read_through(pre)
        read_through(post)
        print(f"warm-up read: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    jobs = ["-j", str(args.jobs)] if args.jobs else []
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    logs = Path(tempfile.mkdtemp(prefix="bench-logs-", dir=work))
    for r in range(args.rounds):
        for m in methods:
            if m == "mergekit" and args.mergekit_rounds is not None and r >= args.mergekit_rounds:
                continue
            out = work / f"out-{m}"
            remove(out)
            log = logs / f"{m}-{r}.log"
            if m == "startup":
                cmd = [qk, "--version"]
            elif m == "copy":
                cmd = [sys.executable, "-c", COPY_CODE, str(post), str(out)]
            elif m == "mergekit":
                cmd = [mk, str(mk_cfg), str(out), *args.mergekit_args.split()]
            else:
                exe = args.qkrestore_b if m.endswith("-b") else qk
                cmd = [exe, "merge", str(pre), str(post), "-o", str(out), "--json", "--quiet"]
                cmd += extra
                cmd += {"merge": jobs, "merge-j1": ["-j", "1"], "link": ["--link", *jobs]}[
                    m.removesuffix("-b")
                ]
            if args.cold:
                drop_caches()
            wall, rss, rc = run_child(cmd, log)
            run: dict = {"round": r, "seconds": round(wall, 3), "peak_rss_bytes": rss, "rc": rc}
            if args.to_disk and m != "startup":
                flush = flush_tree(out)
                run |= {"return_s": round(wall, 3), "flush_s": round(flush, 3)}
                run["seconds"] = round(wall + flush, 3)
                wall += flush
            if rc != 0:
                run["log_tail"] = log.read_text(errors="replace")[-2000:]
            elif m not in ("copy", "mergekit", "startup"):
                summary = json.loads(log.read_text())
                run["bytes_read_from_pre"] = summary.get("bytes_read_from_pre")
                run["restored_bytes"] = summary.get("restored_bytes")
                run["linked_files"] = len(summary.get("linked_files") or [])
            runs[m].append(run)
            print(
                f"round {r + 1} {m:9s} {wall:7.2f} s  peak RSS {fmt_bytes(rss):>9s}  rc={rc}",
                file=sys.stderr,
            )
            remove(out)
            if not args.no_sync:
                settle(args.settle)
    shutil.rmtree(logs, ignore_errors=True)

    results = summarize(methods, runs, pair)
    doc = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "page_cache": "cold: dropped before every run"
        if args.cold
        else "warm: PRE/POST read once before timing",
        "to_disk": args.to_disk,
        "pair": pair,
        "rounds": args.rounds,
        "jobs": args.jobs,
        "merge_args": args.merge_args,
        "qkrestore": qk,
        "qkrestore_b": args.qkrestore_b,
        "mergekit": mk,
        "mergekit_args": args.mergekit_args if mk else None,
        "methods": results,
        "runs": runs,
    }
    table = markdown(doc)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0 if all(r["rc"] == 0 for rs in runs.values() for r in rs) else 1


def summarize(methods: list[str], runs: dict[str, list[dict]], pair: dict) -> dict[str, dict]:
    results: dict[str, dict] = {}
    ok = {m: [r for r in runs[m] if r["rc"] == 0] for m in methods}
    base = statistics.median(r["seconds"] for r in ok["copy"]) if ok.get("copy") else None
    for m in methods:
        rs = ok[m]
        if not rs:
            results[m] = {"label": LABELS[m], "ok_runs": 0, "failed_runs": len(runs[m])}
            continue
        med = statistics.median(r["seconds"] for r in rs)
        res = {
            "label": LABELS[m],
            "ok_runs": len(rs),
            "failed_runs": len(runs[m]) - len(rs),
            "median_s": round(med, 3),
            "min_s": min(r["seconds"] for r in rs),
            "max_s": max(r["seconds"] for r in rs),
            "ratio_to_copy": round(med / base, 3) if base else None,
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
            "throughput_gb_s": round(pair["post_bytes"] / med / 1e9, 3),
        }
        if "flush_s" in rs[0]:
            res["median_return_s"] = round(statistics.median(r["return_s"] for r in rs), 3)
            res["median_flush_s"] = round(statistics.median(r["flush_s"] for r in rs), 3)
        if m in QK_METHODS:
            res["bytes_read_from_pre"] = max(r["bytes_read_from_pre"] for r in rs)
            res["restored_bytes"] = rs[0]["restored_bytes"]
            res["pre_read_ratio"] = round(res["bytes_read_from_pre"] / res["restored_bytes"], 4)
            res["linked_files"] = rs[0]["linked_files"]
        elif m == "mergekit":
            # A linear merge loads every input tensor; at least the routing tensors whole.
            res["pre_tensor_bytes_taken"] = pair["mergekit_pre_tensor_bytes"]
        results[m] = res
    if "mergekit" in results and "median_s" in results["mergekit"]:
        mkr = results["mergekit"]
        for m in QK_METHODS:
            if m in results and "median_s" in results[m]:
                results[m]["speedup_vs_mergekit"] = round(
                    mkr["median_s"] / results[m]["median_s"], 2
                )
                results[m]["memory_vs_mergekit"] = round(
                    mkr["peak_rss_bytes"] / results[m]["peak_rss_bytes"], 1
                )
    return results


def markdown(doc: dict) -> str:
    pair = doc["pair"]
    title = pair["label"] or Path(pair["post"]).parent.name
    head = (
        f"**{title}**: POST {fmt_bytes(pair['post_bytes'])} in {pair['shards']} shards "
        f"({pair['model_type']}), {pair['restored_tensors']} tensors of layers {pair['layers']} "
        f"restored = {fmt_bytes(pair['restored_bytes'])} in {pair['touched_shards']} of "
        f"{pair['shards']} shards; {doc['machine']['cpus']} CPUs, "
        f"{'cold' if doc['page_cache'].startswith('cold') else 'warm'} page cache, "
        f"{'time to bytes on disk, ' if doc.get('to_disk') else ''}"
        f"median of {doc['rounds']} alternating rounds.\n\n"
    )
    rows = [
        "| method | median s (min–max) | × copy | peak RSS | read from PRE | vs mergekit |",
        "|---|---|---|---|---|---|",
    ]
    for res in doc["methods"].values():
        if "median_s" not in res:
            rows.append(f"| {res['label']} | failed ({res['failed_runs']} runs) | | | | |")
            continue
        ratio = f"{res['ratio_to_copy']:.2f}" if res.get("ratio_to_copy") else "–"
        if "bytes_read_from_pre" in res:
            pre = (
                f"{fmt_bytes(res['bytes_read_from_pre'])} ({res['pre_read_ratio']:.3f} × restored)"
            )
        elif "pre_tensor_bytes_taken" in res:
            pre = f"all PRE tensors loaded; {fmt_bytes(res['pre_tensor_bytes_taken'])} kept"
        else:
            pre = "–"
        vs = (
            f"{res['speedup_vs_mergekit']:.1f}× faster, {res['memory_vs_mergekit']:.0f}× less memory"
            if "speedup_vs_mergekit" in res
            else ""
        )
        runs = (
            f" ({res['ok_runs']} run{'s' if res['ok_runs'] != 1 else ''})"
            if res["ok_runs"] != doc["rounds"]
            else ""
        )
        if "median_flush_s" in res:
            runs += f" [returns {res['median_return_s']:.2f} + flush {res['median_flush_s']:.2f}]"
        rows.append(
            f"| {res['label']}{runs} | {res['median_s']:.2f} ({res['min_s']:.2f}–{res['max_s']:.2f}) "
            f"| {ratio} | {fmt_bytes(res['peak_rss_bytes'])} | {pre} | {vs} |"
        )
    return head + "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
