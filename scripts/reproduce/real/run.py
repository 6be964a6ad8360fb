#!/usr/bin/env python
"""The real-model experiment: CoT-SFT of a pretrained chat model, then every restore candidate.

    python scripts/reproduce/real/run.py --model /tmp/smollm2 --out runs/real --plan-only
    python scripts/reproduce/real/run.py --model /tmp/smollm2 --out runs/real --shard 1/2
    python scripts/reproduce/real/run.py --model /tmp/smollm2 --out runs/real --shard 2/2
    python scripts/reproduce/real/report.py runs/real --out runs/real

Grid: arms ``short`` (one problem per sequence) and ``packed`` (the same problems packed into
``--pack-len``-token sequences) × ``--lrs`` × ``--seeds``; each run is a full fine-tune of PRE
(AdamW, bf16 autocast on CUDA) on synthetic worked-addition traces in the model's chat template
(traces.py). For each run, qkrestore's own ``sweep`` (:func:`qkrestore.evaluate.sweep.run_sweep`) measures
+SFT and the candidates on the same items: QK-Restore of every softmax layer, the Q/K/V ablations,
QK-Pro (``--fix key``, ``--ridges``) and QK-Restore of ``select-layers``' top-k layers
(:func:`qkrestore.evaluate.select_layers.run_select_layers`, run once on PRE). PRE is measured once.

Recall items are NIAH prompts from qkrestore's own builder in the chat template, reasoning items
held-out problems; both are given to ``sweep`` as a recall file whose every item is its own
group, so that its JSON keeps each item's outcome (needed for paired, item-level intervals).

Budget: every run writes ``run-<name>.json`` as soon as it is measured; ``--deadline-s`` stops
before a run that would not finish in time; ``--shard i/n`` splits the grid; ``--plan-only`` prints
the token counts. PRE's measurement and the top-k layers are cached in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import traces  # noqa: E402

CANDIDATE_SETS = ("restore", "ablations", "pro", "top-k")
# Throughputs assumed by --plan-only's time estimate (tokens/s on one H100 for a 135M model); the
# script logs the real ones, so correct these from a run's log.
ASSUME_FWD_TPS = 250_000
ASSUME_TRAIN_TPS = 80_000


def run_grid(arms: list[str], lrs: list[float], seeds: list[int]) -> list[dict[str, Any]]:
    """Runs in seed-major order, so that a cut-short call still covers every arm and rate."""
    return [
        {"arm": a, "lr": lr, "seed": s, "name": f"{a}-lr{lr:g}-s{s}"}
        for s in seeds
        for lr in lrs
        for a in arms
    ]


def shard(runs: list[dict[str, Any]], spec: str | None) -> list[dict[str, Any]]:
    """``i/n``: the i-th of n contiguous parts (each part keeps the seed-major order)."""
    if not spec:
        return runs
    i, n = (int(x) for x in spec.split("/"))
    if not 1 <= i <= n:
        raise SystemExit(f"--shard {spec}: need 1 <= i <= n")
    size = math.ceil(len(runs) / n)
    return runs[(i - 1) * size : i * size]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="PRE: a local chat model folder")
    ap.add_argument("--out", type=Path, required=True, help="where run-*.json, pre.json go")
    ap.add_argument("--work", type=Path, default=None, help="scratch (POST checkpoints, cache); "
                    "default OUT/.work")  # fmt: skip
    ap.add_argument("--arms", default="short,packed")
    ap.add_argument("--lrs", default="5e-5,2e-4")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--shard", default=None, help="i/n: run only the i-th of n parts of the grid")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--problems-per-step", type=int, default=160)
    ap.add_argument("--pack-len", type=int, default=4096)
    ap.add_argument("--micro-tokens", type=int, default=16384, help="tokens per forward in SFT")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of steps")
    ap.add_argument("--tasks", default="single-2")
    ap.add_argument("--lengths", default="1024,2048,4096,8192")
    ap.add_argument("--samples", type=int, default=100, help="NIAH prompts per task and length")
    ap.add_argument("--reasoning", type=int, default=200, help="held-out problems")
    ap.add_argument("--candidates", default="restore,ablations,pro,top-k")
    ap.add_argument("--ridges", default="0.1,1")
    ap.add_argument("--fix", default="key")
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--select-tasks", default="single-2")
    ap.add_argument("--select-lengths", default="4096,8192")
    ap.add_argument("--select-samples", type=int, default=12)
    ap.add_argument("--pre-eval", choices=("auto", "yes", "no"), default="auto",
                    help="auto: measure PRE in shard 1 (or without --shard) unless cached")  # fmt: skip
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=16, help="items per scoring forward")
    ap.add_argument("--deadline-s", type=float, default=0.0,
                    help="start no run that would end later than this many seconds after start")  # fmt: skip
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--plan-only", action="store_true")
    return ap.parse_args(argv)


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def words(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


class Log:
    def __init__(self, path: Path) -> None:
        self.t0 = time.perf_counter()
        self.f = path.open("a", encoding="utf-8")

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")
        self.f.flush()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


# -- planning (pure) ------------------------------------------------------------------------------


def plan(args: argparse.Namespace, n_runs: int, layers: int, per_problem: tuple[float, float, float]) -> dict[str, Any]:  # fmt: skip
    """Token counts for the selected runs (forward tokens of evaluation, SFT tokens)."""
    tasks, lengths = words(args.tasks), ints(args.lengths)
    prompt, resp, widest = per_problem
    niah = len(tasks) * sum(lengths) * args.samples
    reasoning = args.reasoning * (prompt + resp)
    per_candidate = niah + reasoning
    sets = set(words(args.candidates))
    cands = 1 + ("restore" in sets) + 3 * ("ablations" in sets)
    cands += len(floats(args.ridges)) * ("pro" in sets) + ("top-k" in sets)
    select = 0.0
    if "top-k" in sets:
        select = (layers + 1) * len(words(args.select_tasks)) * sum(ints(args.select_lengths))
        select *= args.select_samples
    problems = args.steps * args.problems_per_step
    sft_packed = problems * (prompt + resp)
    sft_short = problems * widest  # padded to the widest problem of a batch (upper bound)
    arms = words(args.arms)
    sft = n_runs * (sft_packed if arms == ["packed"] else (sft_packed + sft_short) / 2)
    fwd = n_runs * cands * per_candidate
    return {
        "runs": n_runs,
        "candidates_per_run": cands,
        "eval_tokens_per_candidate": round(per_candidate),
        "eval_forward_tokens": round(fwd),
        "pre_forward_tokens": round(per_candidate),
        "select_layers_forward_tokens": round(select),
        "sft_tokens": round(sft),
        "sft_tokens_per_run_packed": round(sft_packed),
        "estimated_seconds": round(
            (fwd + per_candidate + select) / ASSUME_FWD_TPS + sft / ASSUME_TRAIN_TPS
        ),
        "assumed_tokens_per_s": {"forward": ASSUME_FWD_TPS, "train": ASSUME_TRAIN_TPS},
    }


# -- SFT ------------------------------------------------------------------------------------------


def lr_at(step: int, steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    w = max(1, round(warmup * steps))
    if step < w:
        return peak * (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def micro_batches(b: traces.Batch, budget: int) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Split a step's sequences into forwards of at most ``budget`` padded tokens."""
    out, cur_i, cur_m = [], [], []  # type: ignore[var-annotated]
    for ids, m in zip(b.ids, b.mask):
        width = max([len(ids), *map(len, cur_i)])
        if cur_i and width * (len(cur_i) + 1) > budget:
            out.append((cur_i, cur_m))
            cur_i, cur_m = [], []
        cur_i.append(ids)
        cur_m.append(m)
    if cur_i:
        out.append((cur_i, cur_m))
    return out


def sft(pre: Path, post: Path, codec: traces.ChatCodec, run: dict[str, Any], args: argparse.Namespace,
        device: Any, held_out: set[tuple[int, ...]], log: Log) -> dict[str, Any]:  # fmt: skip
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(run["seed"])
    model = AutoModelForCausalLM.from_pretrained(str(pre), dtype=torch.float32).to(device)
    model.train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(
        model.parameters(), lr=run["lr"], betas=(0.9, 0.95), weight_decay=0.0,
        fused=device.type == "cuda",
    )  # fmt: skip
    cuda = device.type == "cuda"
    pad = codec.tok.pad_token_id if codec.tok.pad_token_id is not None else 0
    curve: list[list[float]] = []
    tokens = padded = targets = 0
    t0 = time.perf_counter()
    for step, b in enumerate(
        traces.batches(codec, run["arm"], run["seed"], args.steps, args.problems_per_step,
                     args.pack_len, held_out)
    ):  # fmt: skip
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, run["lr"], args.warmup)
        n_t = b.targets
        total = 0.0
        for seqs, masks in micro_batches(b, args.micro_tokens):
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            att = torch.zeros((len(seqs), width), dtype=torch.long)
            lab = torch.full((len(seqs), width), -100, dtype=torch.long)
            for r, (s, m) in enumerate(zip(seqs, masks)):
                ids[r, : len(s)] = torch.tensor(s)
                att[r, : len(s)] = 1
                lab[r, : len(s)] = torch.where(torch.tensor(m) > 0, torch.tensor(s), -100)
            ids, att, lab = ids.to(device), att.to(device), lab.to(device)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else _null()
            with amp:
                logits = model(input_ids=ids, attention_mask=att).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                lab[:, 1:].reshape(-1), ignore_index=-100, reduction="sum",
            ) / n_t  # fmt: skip
            loss.backward()
            total += float(loss.detach())
            padded += ids.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += b.tokens
        targets += n_t
        if step == 0 or (step + 1) % max(1, args.steps // 10) == 0:
            curve.append([step + 1, round(total, 4)])
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    log(f"{run['name']}: SFT {args.steps} steps, {tokens} tokens ({padded} padded) in "
        f"{secs:.1f}s = {padded / secs:,.0f} tok/s; loss {curve[0][1]} -> {curve[-1][1]}")  # fmt: skip
    t1 = time.perf_counter()
    model.to(torch.bfloat16 if cuda else torch.float32)
    model.config.use_cache = True
    model.save_pretrained(str(post))
    for f in pre.iterdir():  # tokenizer, chat template, generation config: PRE's
        if f.is_file() and not (post / f.name).exists() and not f.name.startswith("model"):
            shutil.copy2(f, post / f.name)
    del model, opt
    if cuda:
        torch.cuda.empty_cache()
    return {
        "steps": args.steps,
        "problems_per_step": args.problems_per_step,
        "tokens": tokens,
        "padded_tokens": padded,
        "target_tokens": targets,
        "curve": curve,
        "seconds": round(secs, 2),
        "save_seconds": round(time.perf_counter() - t1, 2),
        "tokens_per_s": round(padded / secs),
    }


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


# -- measuring through qkrestore ------------------------------------------------------------------


def outcomes(doc_cand: dict[str, Any], items: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-item 0/1 strings from a sweep candidate's per-group recall (one item per group)."""
    rec = doc_cand["recall"]
    niah: dict[str, str] = {}
    reasoning = ""
    for x in items:
        bit = "1" if rec[traces.group_of(x)] >= 0.5 else "0"
        if x["kind"] == "niah":
            key = f"{x['task']}/{x['length']}"
            niah[key] = niah.get(key, "") + bit
        else:
            reasoning += bit
    return {
        "group": doc_cand.get("group"),
        "planned_layers": doc_cand.get("planned_layers"),
        "seconds": doc_cand.get("seconds"),
        "niah": niah,
        "reasoning": reasoning,
    }


def sweep(pre: Path, post: Path, items: list[dict[str, Any]], groups: tuple[str, ...],
          args: argparse.Namespace, device: Any, layers: list[int] | None = None) -> dict[str, Any]:  # fmt: skip
    import torch

    from qkrestore.evaluate.runner import Item
    from qkrestore.evaluate.sweep import SweepConfig, run_sweep

    recall = [Item(tuple(x["prompt"]), tuple(x["answer"]), traces.group_of(x)) for x in items]
    cfg = SweepConfig(
        layers=layers,
        groups=groups,
        ridges=tuple(floats(args.ridges)),
        fixes=(args.fix,),
        recall_items=recall,
        device=device,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        autocast=True,
        batch_size=args.batch_size,
    )
    return run_sweep(pre, post, cfg)


def select_top(pre: Path, items: list[dict[str, Any]], args: argparse.Namespace, device: Any) -> dict[str, Any]:  # fmt: skip
    import torch

    from qkrestore.evaluate.measuring import Measurement
    from qkrestore.evaluate.runner import Item
    from qkrestore.evaluate.select_layers import SelectConfig, run_select_layers

    recall = [Item(tuple(x["prompt"]), tuple(x["answer"]), f"{x['length']}") for x in items]
    cfg = SelectConfig(
        measurement=Measurement(
            recall_items=recall,
            device=device,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            autocast=True,
            batch_size=args.batch_size,
        )
    )
    doc = run_select_layers(pre, cfg)
    top = sorted(r["layer"] for r in doc["ranking"][: args.top_k])
    return {
        "top_layers": top,
        "unablated": doc["unablated_score"],
        "ranking": [{k: r[k] for k in ("layer", "drop", "rank")} for r in doc["ranking"]],
        "seconds": doc["seconds"],
    }


def versions(device: Any) -> dict[str, str]:
    import torch
    import transformers

    import qkrestore

    v = {"torch": torch.__version__, "transformers": transformers.__version__,
         "qkrestore": qkrestore.__version__, "python": sys.version.split()[0]}  # fmt: skip
    if device.type == "cuda":
        v["gpu"] = torch.cuda.get_device_name(device)
    return v


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from qkrestore.io.runtime import quiet_transformers

    quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = shard(run_grid(words(args.arms), floats(args.lrs), ints(args.seeds)), args.shard)
    tok = AutoTokenizer.from_pretrained(str(args.model))
    codec = traces.ChatCodec(tok)
    n_layers = int(AutoConfig.from_pretrained(str(args.model)).num_hidden_layers)
    if args.plan_only:
        est = plan(args, len(runs), n_layers, traces.mean_tokens(codec))
        est["selected_runs"] = [r["name"] for r in runs]
        print(json.dumps(est, indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / ".work"
    work.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "log.txt")
    dev = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev)
    log(f"runs: {', '.join(r['name'] for r in runs)} on {device}; {json.dumps(versions(device))}")

    t = time.perf_counter()
    held = traces.eval_problems(args.reasoning)
    held_out = {p.terms for p in held}
    items = traces.niah_items(codec, words(args.tasks), ints(args.lengths), args.samples)
    items += traces.reasoning_items(codec, args.reasoning)
    fwd_tokens = sum(len(x["prompt"]) + len(x["answer"]) for x in items)
    log(f"items: {len(items)} ({fwd_tokens} tokens per candidate) built in "
        f"{time.perf_counter() - t:.1f}s")  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["eval_tokens_per_candidate"] = fwd_tokens

    pre_path = work / "pre.json"
    first = args.shard is None or args.shard.startswith("1/")
    if args.pre_eval == "yes" or (args.pre_eval == "auto" and first and not pre_path.exists()):
        t = time.perf_counter()
        doc = sweep(args.model, args.model, items, ("pre",), args, device)
        pre_doc = {"config": config, "versions": versions(device),
                   "candidates": {"pre": outcomes(doc["candidates"][0], items)},
                   "seconds": round(time.perf_counter() - t, 2)}  # fmt: skip
        write_json(pre_path, pre_doc)
        log(f"PRE measured in {pre_doc['seconds']}s "
            f"({fwd_tokens / pre_doc['seconds']:,.0f} tok/s)")  # fmt: skip
    if pre_path.exists():
        shutil.copy2(pre_path, args.out / "pre.json")

    sets = set(words(args.candidates))
    top: dict[str, Any] | None = None
    if "top-k" in sets:
        sel_path = work / "select.json"
        if sel_path.exists():
            top = json.loads(sel_path.read_text())
            log(f"select-layers: cached top-{args.top_k} {top['top_layers']}")
        else:
            sel_items = traces.niah_items(codec, words(args.select_tasks),
                                        ints(args.select_lengths), args.select_samples,
                                        seed_offset=10_000)  # fmt: skip
            top = select_top(args.model, sel_items, args, device)
            write_json(sel_path, top)
            log(f"select-layers on PRE: top-{args.top_k} {top['top_layers']} in {top['seconds']}s")
        shutil.copy2(sel_path, args.out / "select.json")

    groups = ("post", *[g for g in ("restore", "ablations", "pro") if g in sets])
    longest = 0.0
    for run in runs:
        if args.deadline_s and log.elapsed() + max(longest, 1.0) * 1.1 > args.deadline_s:
            log(f"{run['name']}: skipped, it would not end before --deadline-s {args.deadline_s}")
            continue
        t_run = time.perf_counter()
        post = work / f"post-{run['name']}"
        if post.exists():
            shutil.rmtree(post)
        res: dict[str, Any] = {**run, "config": config, "versions": versions(device)}
        res["sft"] = sft(args.model, post, codec, run, args, device, held_out, log)
        t = time.perf_counter()
        doc = sweep(args.model, post, items, groups, args, device)
        cands = {c["name"]: outcomes(c, items) for c in doc["candidates"]}
        sweep_s = time.perf_counter() - t
        topk_s = 0.0
        if top is not None:
            t = time.perf_counter()
            d2 = sweep(args.model, post, items, ("restore",), args, device, top["top_layers"])
            cands[f"qk-restore-top{args.top_k}"] = outcomes(d2["candidates"][0], items)
            topk_s = time.perf_counter() - t
        res["top_layers"] = top["top_layers"] if top else None
        res["candidates"] = cands
        total = time.perf_counter() - t_run
        n_eval = len(cands)
        res["phases"] = {
            "sft_s": res["sft"]["seconds"],
            "save_s": res["sft"]["save_seconds"],
            "sweep_s": round(sweep_s, 2),
            "topk_s": round(topk_s, 2),
            "total_s": round(total, 2),
            "eval_tokens_per_s": round(n_eval * fwd_tokens / max(sweep_s + topk_s, 1e-9)),
        }
        write_json(args.out / f"run-{run['name']}.json", res)
        shutil.rmtree(post, ignore_errors=True)
        longest = max(longest, total)
        log(f"{run['name']}: done in {total:.1f}s (eval {sweep_s + topk_s:.1f}s, "
            f"{res['phases']['eval_tokens_per_s']:,} tok/s over {n_eval} candidates)")  # fmt: skip
    log("finished")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
