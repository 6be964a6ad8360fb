#!/usr/bin/env python
"""Paired contrasts of the real-model experiment: report.md, report.json and report.png.

    python scripts/reproduce/real/report.py OUT_DIR [OUT_DIR ...] --out OUT_DIR

Reads ``pre.json``, ``select.json`` and every ``run-*.json`` that run.py wrote (several folders:
the grid's shards), and reports each candidate **against +SFT of the same run**:

* across runs of an arm (and of an arm × learning rate): the mean of the per-run differences in
  accuracy with a Student-t 95 % interval over runs, and how many runs went each way;
* per run, over items (the same prompts for both models): the difference with Agresti–Min's paired
  95 % interval and McNemar's exact p-value;
* the arms against each other, paired by (learning rate, seed), which share their training problems;
* levels (accuracy means) only for context.

It says which intervals exclude zero and which do not; nothing is corrected for multiplicity.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from paired import Interval, accuracy, paired_items, t_interval  # noqa: E402

BASE = "post"
LABELS = {
    "pre": "PRE",
    "post": "+SFT",
    "qk-restore": "+QK-Restore (all layers)",
    "restore-q": "Q-Restore",
    "restore-k": "K-Restore",
    "restore-v": "V-Restore",
}


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    if name.startswith("pro-"):
        _, fix, r = name.split("-", 2)
        return f"QK-Pro (fix {fix}, R={r.removeprefix('r')})"
    if name.startswith("qk-restore-top"):
        return f"QK-Restore, select-layers top-{name.removeprefix('qk-restore-top')}"
    return name


def load(dirs: Sequence[Path]) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:  # fmt: skip
    pre = sel = None
    runs: dict[str, dict[str, Any]] = {}
    for d in dirs:
        if (d / "pre.json").is_file():
            pre = json.loads((d / "pre.json").read_text())
        if (d / "select.json").is_file():
            sel = json.loads((d / "select.json").read_text())
        for f in sorted(d.glob("run-*.json")):
            r = json.loads(f.read_text())
            runs[r["name"]] = r
    order = sorted(runs.values(), key=lambda r: (r["arm"] != "short", r["arm"], r["lr"], r["seed"]))
    return pre, sel, order


# -- metrics: each a list of 0/1 outcomes over items -----------------------------------------------


def bits(cand: dict[str, Any], metric: str) -> list[int]:
    """``niah`` (every NIAH item), ``niah@L`` (every task at length L), ``niah:T@L`` (one cell)
    or ``reasoning``."""
    if metric == "reasoning":
        s = cand["reasoning"]
    elif metric == "niah":
        s = "".join(cand["niah"][k] for k in sorted(cand["niah"]))
    elif metric.startswith("niah@"):
        length = metric.split("@", 1)[1]
        s = "".join(v for k, v in sorted(cand["niah"].items()) if k.split("/")[1] == length)
    else:
        task, length = metric.removeprefix("niah:").split("@")
        s = cand["niah"][f"{task}/{length}"]
    return [int(c) for c in s]


def metrics(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted(runs[0]["candidates"][BASE]["niah"], key=lambda k: (int(k.split("/")[1]), k))
    lengths = sorted({int(k.split("/")[1]) for k in keys})
    out = ["niah", *(f"niah@{n}" for n in lengths)]
    if len({k.split("/")[0] for k in keys}) > 1:
        out += [f"niah:{k.replace('/', '@')}" for k in keys]
    if runs[0]["candidates"][BASE]["reasoning"]:
        out.append("reasoning")
    return out


def metric_title(m: str) -> str:
    if m == "niah":
        return "NIAH (all)"
    if m.startswith("niah@"):
        return f"NIAH@{m[5:]}"
    if m.startswith("niah:"):
        return f"NIAH {m[5:]}"
    return "reasoning (exact)"


def candidates(runs: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in runs:
        names += [n for n in r["candidates"] if n not in names and n != BASE]
    return names


def diff(run: dict[str, Any], name: str, metric: str) -> float | None:
    c = run["candidates"].get(name)
    if c is None:
        return None
    return accuracy(bits(c, metric)) - accuracy(bits(run["candidates"][BASE], metric))


def across(runs: list[dict[str, Any]], name: str, metric: str) -> Interval | None:
    d = [x for r in runs if (x := diff(r, name, metric)) is not None]
    return t_interval(d) if d else None


def groups(runs: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Arms pooled over learning rates, then each arm × learning rate."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    out = [(f"{a} (all lr)", [r for r in runs if r["arm"] == a]) for a in arms]
    lrs = sorted({r["lr"] for r in runs})
    if len(lrs) > 1:
        out += [
            (f"{a}, lr {lr:g}", [r for r in runs if r["arm"] == a and r["lr"] == lr])
            for a in arms
            for lr in lrs
        ]
    return [(g, rs) for g, rs in out if rs]


def contrasts(runs: list[dict[str, Any]], pre: dict[str, Any] | None) -> dict[str, Any]:
    """Everything report.md shows, as numbers (also written to report.json)."""
    ms = metrics(runs)
    names = candidates(runs)
    doc: dict[str, Any] = {"metrics": ms, "candidates": names, "runs": [r["name"] for r in runs]}
    doc["across"] = [
        {"group": g, "candidate": n, "metric": m, **_iv(across(rs, n, m))}
        for g, rs in groups(runs)
        for n in names
        for m in ms
        if across(rs, n, m) is not None
    ]
    doc["items"] = [
        {"run": r["name"], "candidate": n, "metric": m,
         **_iv(paired_items(bits(r["candidates"][n], m), bits(r["candidates"][BASE], m)))}
        for r in runs
        for n in names
        if n in r["candidates"]
        for m in ms
    ]  # fmt: skip
    if pre is not None:
        p = pre["candidates"]["pre"]
        doc["damage"] = [
            {"group": g, "metric": m,
             **_iv(t_interval([accuracy(bits(r["candidates"][BASE], m)) - accuracy(bits(p, m))
                               for r in rs]))}
            for g, rs in groups(runs)
            for m in ms
        ]  # fmt: skip
    doc["arms"] = arm_contrasts(runs, names, ms, pre)
    doc["levels"] = levels(runs, ms, pre)
    return doc


def arm_contrasts(runs: list[dict[str, Any]], names: list[str], ms: list[str], pre: dict[str, Any] | None) -> list[dict[str, Any]]:  # fmt: skip
    """packed − short, paired by (lr, seed): of each candidate's gain over +SFT, and of +SFT."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    if sorted(arms) != ["packed", "short"]:
        return []
    by = {(r["arm"], r["lr"], r["seed"]): r for r in runs}
    pairs = [
        (by[k], by[("packed", *k[1:])]) for k in by if k[0] == "short" and ("packed", *k[1:]) in by
    ]
    out = []
    for n in [BASE, *names]:
        for m in ms:
            d = []
            for s, p in pairs:
                if n == BASE:
                    d.append(
                        accuracy(bits(p["candidates"][BASE], m))
                        - accuracy(bits(s["candidates"][BASE], m))
                    )
                elif n in s["candidates"] and n in p["candidates"]:
                    d.append(diff(p, n, m) - diff(s, n, m))  # type: ignore[operator]
            if d:
                out.append({"candidate": n, "metric": m, **_iv(t_interval(d))})
    return out


def levels(runs: list[dict[str, Any]], ms: list[str], pre: dict[str, Any] | None) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    if pre is not None:
        out.append({"group": "-", "candidate": "pre",
                    **{m: accuracy(bits(pre["candidates"]["pre"], m)) for m in ms}, "n": 1})  # fmt: skip
    for g, rs in groups(runs):
        for n in [BASE, *candidates(rs)]:
            have = [r for r in rs if n in r["candidates"]]
            if have:
                out.append({"group": g, "candidate": n, "n": len(have),
                            **{m: sum(accuracy(bits(r["candidates"][n], m)) for r in have) / len(have)
                               for m in ms}})  # fmt: skip
    return out


def _iv(iv: Interval | None) -> dict[str, Any]:
    if iv is None:
        return {}
    return {"estimate": iv.estimate, "lo": iv.lo, "hi": iv.hi, "n": iv.n, "p": iv.p,
            "wins": iv.wins, "losses": iv.losses}  # fmt: skip


def _cell(row: dict[str, Any]) -> str:
    return Interval(row["estimate"], row["lo"], row["hi"], row["n"]).text()


# -- markdown -------------------------------------------------------------------------------------


def markdown(doc: dict[str, Any], runs: list[dict[str, Any]], sel: dict[str, Any] | None) -> str:
    ms = doc["metrics"]
    head = [m for m in ms if m == "niah" or m == "reasoning" or m == f"niah@{_longest(ms)}"]
    lines = ["# Real-model experiment: paired contrasts", ""]
    cfg = runs[0]["config"]
    lines += [
        f"{len(runs)} runs ({', '.join(sorted({r['arm'] for r in runs}))}; lr "
        f"{', '.join(f'{x:g}' for x in sorted({r['lr'] for r in runs}))}; seeds "
        f"{', '.join(str(x) for x in sorted({r['seed'] for r in runs}))}); {cfg['steps']} SFT steps of "
        f"{cfg['problems_per_step']} problems; NIAH {cfg['tasks']} at {cfg['lengths']} tokens, "
        f"{cfg['samples']} prompts per task and length; reasoning: {cfg['reasoning']} held-out "
        "problems (exact worked solution). Both scored teacher-forced by qkrestore's sweep.",
        "",
        "Every number is a **difference against +SFT of the same run**, in accuracy points, with "
        "its 95 % interval. *Across runs*: mean of the per-run differences, Student-t interval over "
        "runs (n = runs), and runs better/worse. Intervals are not corrected for the number of "
        "comparisons.",
        "",
    ]
    if sel:
        lines += [f"select-layers (on PRE): top-{len(sel['top_layers'])} layers "
                  f"{sel['top_layers']}.", ""]  # fmt: skip
    lines += ["## Candidate − +SFT, across runs", ""]
    lines += [
        "| arm | candidate | "
        + " | ".join(metric_title(m) for m in head)
        + " | runs +/− (NIAH) | n |",
        "|---|---|" + "---|" * len(head) + "---|---|",
    ]
    for g, _ in groups(runs):
        for n in doc["candidates"]:
            rows = {
                r["metric"]: r for r in doc["across"] if r["group"] == g and r["candidate"] == n
            }
            if not rows:
                continue
            first = rows[head[0]]
            lines.append(
                f"| {g} | {label(n)} | " + " | ".join(_cell(rows[m]) for m in head)
                + f" | {first['wins']}/{first['losses']} | {first['n']} |"
            )  # fmt: skip
    lines += ["", "### By length (all arms' groups)", ""]
    nl = [m for m in ms if m.startswith("niah@")]
    lines += ["| arm | candidate | " + " | ".join(metric_title(m) for m in nl) + " |",
              "|---|---|" + "---|" * len(nl)]  # fmt: skip
    for g, _ in groups(runs):
        for n in doc["candidates"]:
            rows = {
                r["metric"]: r for r in doc["across"] if r["group"] == g and r["candidate"] == n
            }
            if rows:
                lines.append(
                    f"| {g} | {label(n)} | " + " | ".join(_cell(rows[m]) for m in nl) + " |"
                )
    if doc.get("damage"):
        lines += ["", "## +SFT − PRE (what the fine-tune cost or gained), across runs", ""]
        lines += ["| arm | " + " | ".join(metric_title(m) for m in ms) + " |",
                  "|---|" + "---|" * len(ms)]  # fmt: skip
        for g, _ in groups(runs):
            rows = {r["metric"]: r for r in doc["damage"] if r["group"] == g}
            lines.append(f"| {g} | " + " | ".join(_cell(rows[m]) for m in ms) + " |")
    if doc["arms"]:
        lines += ["", "## packed − short, paired by (learning rate, seed)", "",
                  "For +SFT: the difference of levels; for a candidate: the difference of its gain "
                  "over +SFT.", ""]  # fmt: skip
        lines += ["| of | " + " | ".join(metric_title(m) for m in head) + " | n |",
                  "|---|" + "---|" * len(head) + "---|"]  # fmt: skip
        for n in [BASE, *doc["candidates"]]:
            rows = {r["metric"]: r for r in doc["arms"] if r["candidate"] == n}
            if rows:
                lines.append(f"| {label(n)} | " + " | ".join(_cell(rows[m]) for m in head)
                             + f" | {rows[head[0]]['n']} |")  # fmt: skip
    lines += ["", "## Per run, over items (Agresti–Min 95 % interval; McNemar exact p)", ""]
    lines += ["| run | candidate | " + " | ".join(f"{metric_title(m)} | p" for m in head) + " |",
              "|---|---|" + "---|---|" * len(head)]  # fmt: skip
    for r in runs:
        for n in doc["candidates"]:
            rows = {
                x["metric"]: x
                for x in doc["items"]
                if x["run"] == r["name"] and x["candidate"] == n
            }
            if rows:
                lines.append(f"| {r['name']} | {label(n)} | "
                             + " | ".join(f"{_cell(rows[m])} | {rows[m]['p']:.3g}" for m in head) + " |")  # fmt: skip
    lines += ["", "## Levels (accuracy, %; means over runs, for context only)", ""]
    lines += ["| arm | model | " + " | ".join(metric_title(m) for m in ms) + " | n |",
              "|---|---|" + "---|" * len(ms) + "---|"]  # fmt: skip
    for row in doc["levels"]:
        lines.append(f"| {row['group']} | {label(row['candidate'])} | "
                     + " | ".join(f"{100 * row[m]:.1f}" for m in ms) + f" | {row['n']} |")  # fmt: skip
    lines += ["", "## What is and is not established", "", *established(doc)]
    lines += ["", "## Time per run", "", "| run | SFT s | SFT tok/s | eval s | eval tok/s |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        ph = r["phases"]
        lines.append(f"| {r['name']} | {ph['sft_s']} | {r['sft']['tokens_per_s']:,} | "
                     f"{ph['sweep_s'] + ph['topk_s']:.1f} | {ph['eval_tokens_per_s']:,} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _longest(ms: list[str]) -> str:
    ls = [int(m[5:]) for m in ms if m.startswith("niah@")]
    return str(max(ls)) if ls else ""


def established(doc: dict[str, Any]) -> list[str]:
    """One line per (arm, candidate, headline metric): whether its across-runs interval excludes 0."""
    out = []
    for r in doc["across"]:
        if "(all lr)" not in r["group"] or r["metric"] not in ("niah", "reasoning"):
            continue
        what = metric_title(r["metric"])
        iv = Interval(r["estimate"], r["lo"], r["hi"], r["n"])
        if r["lo"] is None:
            verdict = "not testable (one run)"
        elif iv.excludes_zero():
            verdict = (
                "**better than +SFT**" if r["lo"] > 0 else "**worse than +SFT**"
            ) + " (interval excludes 0)"
        else:
            verdict = "not distinguishable from +SFT (interval contains 0)"
        out.append(f"- {r['group']}: {label(r['candidate'])}, {what}: {iv.text()} — {verdict}.")
    out += [
        "- Not established by this design: anything beyond this model, these traces and these "
        "lengths; effects smaller than the intervals' half-widths; NIAH and reasoning are scored "
        "teacher-forced (the needle must be the arg-max token by token; the worked solution must "
        "be reproduced exactly), which is stricter than free generation.",
    ]
    return out


# -- figure ---------------------------------------------------------------------------------------


def figure(doc: dict[str, Any], runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = ["niah", f"niah@{_longest(doc['metrics'])}"]
    if "reasoning" in doc["metrics"]:
        head.append("reasoning")
    arms = [g for g, _ in groups(runs) if "(all lr)" in g]
    names = doc["candidates"]
    fig, axes = plt.subplots(
        1, len(head), figsize=(4.2 * len(head), 0.45 * len(names) * len(arms) + 1.6), sharey=True
    )
    axes = list(axes) if len(head) > 1 else [axes]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, m in zip(axes, head):
        for a, g in enumerate(arms):
            for i, n in enumerate(names):
                y = i + (a - (len(arms) - 1) / 2) * 0.28
                row = next(
                    (
                        r
                        for r in doc["across"]
                        if r["group"] == g and r["candidate"] == n and r["metric"] == m
                    ),
                    None,
                )
                if row is None:
                    continue
                est = 100 * row["estimate"]
                if row["lo"] is not None:
                    ax.errorbar(est, y, xerr=[[est - 100 * row["lo"]], [100 * row["hi"] - est]],
                                fmt="o", color=colors[a % 4], capsize=3,
                                label=g if i == 0 else None)  # fmt: skip
                else:
                    ax.plot(est, y, "o", color=colors[a % 4], label=g if i == 0 else None)
                pts = [
                    100 * d
                    for r in runs
                    if r["arm"] == g.split()[0] and (d := diff(r, n, m)) is not None
                ]
                ax.plot(pts, [y] * len(pts), "|", color=colors[a % 4], alpha=0.5)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(f"{metric_title(m)}: candidate − +SFT (points)", fontsize=9)
        ax.set_yticks(range(len(names)), [label(n) for n in names], fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(
        "paired contrasts, mean over runs with 95 % t-interval; ticks: single runs", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    pre, sel, runs = load(args.dirs)
    if not runs:
        print(f"no run-*.json under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    doc = contrasts(runs, pre)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "report.md").write_text(markdown(doc, runs, sel))
    if not args.no_plot:
        figure(doc, runs, args.out / "report.png")
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
