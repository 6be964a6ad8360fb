#!/usr/bin/env python
"""Mean and spread over seeds of several runs of one configuration (e.g. the analog setup's).

    python scripts/reproduce/aggregate.py RUN_DIR [RUN_DIR ...] --out docs/reproduce-runs/analog/agg

writes ``agg.md`` (a Table-1-shaped table, the Table 4 rows, the zeroing ablations, recall and CoT
along SFT, ``--locate``'s groups, drift, attention distance and the traces' τ, every cell as mean ±
sample standard deviation over the runs, with n) and ``agg.png`` (recall against length and CoT
accuracy with the runs' min–max as a band or bar, and the SFT curve). Single runs differ a lot
(docs/reproduce.md), so no figure of the analog setup is a single run's.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paired import t_interval

# Table 1's rows, then Table 4's, as run.py names the models
MAIN = ["PRE", "+SFT", "+QK-Restore", "+QK-Pro (R=1)", "+QK-Pro (R=10)"]
TABLE4 = {
    "+Restore {q}": "Q-Restore",
    "+Restore {k}": "K-Restore",
    "+Restore {v}": "V-Restore",
    "QK-Frozen SFT": "QK-Frozen (SFT with W_Q, W_K held)",
}
STYLE = {
    "PRE": ("black", "-"),
    "+SFT": ("tab:red", "-"),
    "+QK-Restore": ("tab:green", "--"),
    "+QK-Pro (R=1)": ("tab:blue", ":"),
    "QK-Frozen SFT": ("tab:purple", "-."),
}


CURVE_LINE = re.compile(r"^\[sft\] curve at step \d+: (\{.*\})$")


def load(run: Path) -> dict:
    """A run's results.json; for a run stopped before its first evaluation (so without one), the
    SFT curve read back from its log.txt, with no models."""
    if (run / "results.json").is_file():
        return json.loads((run / "results.json").read_text())
    curve = [
        ast.literal_eval(m.group(1))
        for line in (run / "log.txt").read_text().splitlines()
        if (m := CURVE_LINE.match(line))
    ]
    lengths = [int(k) for k in curve[0]["recall"]] if curve else []
    return {"seed": run.name, "models": {}, "config": {"lengths": lengths}, "sft": {"curve": curve}}


def curve_figure(runs: list[dict], path: Path) -> None:
    """Recall of +SFT and of +SFT with PRE's QK-Restore rows, and CoT, along SFT: one panel per run
    (runs that diverge are not averaged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False)
    for ax, res in zip(axes[0], runs, strict=True):
        curve = res["sft"]["curve"]
        steps = [p["step"] for p in curve]
        lengths = res["config"]["lengths"]
        for L, color in zip((lengths[0], lengths[-1]), ("tab:cyan", "tab:red"), strict=True):
            ax.plot(steps, [100 * p["recall"][str(L)] for p in curve], color=color, marker="o",
                    ms=3, label=f"+SFT recall@{L}")  # fmt: skip
            if all("recall_qk_restored" in p for p in curve):
                ax.plot(steps, [100 * p["recall_qk_restored"][str(L)] for p in curve], color=color,
                        linestyle="--", label=f"+QK-Restore recall@{L}")  # fmt: skip
        ax.plot(steps, [100 * p["cot"] for p in curve], color="black", marker="s", ms=3,
                label="+SFT CoT answer")  # fmt: skip
        ax.set_ylim(-3, 103)
        ax.set_xlabel("SFT step")
        ax.set_title(f"run {res['seed']}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("%")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stats(values: Iterable[float | None]) -> tuple[float, float, float, float, int] | None:
    """``(mean, sd, min, max, n)`` of the values that are not None (sd: sample, 0 for one)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None
    mean = sum(v) / len(v)
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return mean, sd, min(v), max(v), len(v)


def cell(values: Iterable[float | None], scale: float = 100.0, digits: int = 1) -> str:
    s = stats(values)
    if s is None:
        return "–"
    return f"{scale * s[0]:.{digits}f} ± {scale * s[1]:.{digits}f}"


def model_rows(runs: list[dict], names: dict[str, str], lengths: list[int]) -> list[str]:
    lines = []
    for key, label in names.items():
        ms = [r["models"].get(key) for r in runs]
        if not any(ms):
            continue
        recs = [cell(m["recall"].get(str(L)) if m else None for m in ms) for L in lengths]
        cot = cell(m["reasoning"]["answer"] if m else None for m in ms)
        n = sum(m is not None for m in ms)
        lines.append(f"| {label} | " + " | ".join(recs) + f" | {cot} | {n} |")
    return lines


def table(runs: list[dict]) -> str:
    lengths = runs[0]["config"]["lengths"]
    head = "| model | " + " | ".join(f"recall@{L}" for L in lengths) + " | CoT answer | n |"
    sep = "|---" * (len(lengths) + 3) + "|"
    out = ["### Table 1 shape", "", head, sep]
    out += model_rows(runs, {k: k for k in MAIN}, lengths)
    out += ["", "### Table 4 ablations", "", head, sep]
    out += model_rows(runs, {"+QK-Restore": "QK-Restore", **TABLE4}, lengths)
    extra = {k: k for r in runs for k in r["models"] if k not in MAIN and k not in TABLE4}
    if extra:
        out += ["", "### Other models", "", head, sep, *model_rows(runs, extra, lengths)]

    def groups(key: str, title: str) -> list[str]:
        found = [r.get(key) or {} for r in runs]
        models = sorted({m for f in found for m in f})
        if not models:
            return []
        lines = ["", f"### {title}", "", head.replace("model", "model | rows").replace(
            " CoT answer |", ""), "|---" * (len(lengths) + 3) + "|"]  # fmt: skip
        for model in models:
            labels = list(dict.fromkeys(g for f in found for g in f.get(model, {})))
            for label in labels:
                rs = [f.get(model, {}).get(label) for f in found]
                recs = [cell(r["recall"][str(L)] if r else None for r in rs) for L in lengths]
                n = sum(r is not None for r in rs)
                lines.append(f"| {model} | {label} | " + " | ".join(recs) + f" | {n} |")
        return lines

    out += groups("ablations", "Zeroing ablations (parts of the model set to 0)")
    out += groups("located", "Where the damage lives (`--locate`: PRE's group put back)")
    out += curve_table(runs, lengths)
    out += drift_table(runs)
    out += attn_table(runs)
    out += tau_table(runs)
    out += sweep_table(runs)
    out += paired_table(runs)
    return "\n".join(out) + "\n"


def _sweep_values(c: dict, last: str) -> tuple[float, float | None, float, float]:
    """(recall mean, recall at length ``last``, exact, loglik) of one sweep candidate."""
    rec_last = c.get("recall", {}).get(last)
    return c["recall_mean"], rec_last, c["reasoning"]["exact"], c["reasoning"]["loglik"]


def sweep_table(runs: list[dict]) -> list[str]:
    """``qkrestore sweep``'s candidates over the runs that have one: recall (mean over lengths and
    at the longest), reasoning (exact and log-likelihood), each also as the change from the same
    run's POST, and how often the candidate was on the Pareto front and picked."""
    sweeps = [r["sweep"] for r in runs if r.get("sweep")]
    if not sweeps:
        return []
    names = list(dict.fromkeys(c["name"] for s in sweeps for c in s["candidates"]))
    last = max((k for s in sweeps for c in s["candidates"] for k in c.get("recall", {})), key=int)
    out = ["", f"### `qkrestore sweep` (n = {len(sweeps)} runs; Δ = change from the run's POST)", "",
           f"| candidate | recall | recall@{last} | exact | loglik | Δ recall | Δ exact | Δ loglik "
           "| on front | picked |", "|---" * 10 + "|"]  # fmt: skip
    # per column: (index into _sweep_values, relative to POST?, scale, digits)
    columns = [(0, False, 100.0, 1), (1, False, 100.0, 1), (2, False, 100.0, 1), (3, False, 1.0, 3),
               (0, True, 100.0, 1), (2, True, 100.0, 1), (3, True, 1.0, 3)]  # fmt: skip
    for name in names:
        vals, front, picked = [], 0, 0
        for s in sweeps:
            by = {c["name"]: c for c in s["candidates"]}
            if name in by:
                vals.append((_sweep_values(by[name], last), _sweep_values(by["post"], last)))
                front += bool(by[name].get("pareto"))
                picked += (s.get("pick") or {}).get("name") == name
        cells = [
            cell((v[i] - p[i] if rel else v[i] for v, p in vals), scale, digits)
            for i, rel, scale, digits in columns
        ]
        n = len(vals)
        out.append(f"| {name} | " + " | ".join(cells) + f" | {front}/{n} | {picked}/{n} |")
    return out


# the candidates of a run, each compared with +SFT of the same run
PAIRED = {
    "+QK-Restore": "QK-Restore",
    "+QK-Pro (R=1)": "QK-Pro (R=1)",
    "+Restore {q}": "Q-Restore",
    "+Restore {k}": "K-Restore",
    "+Restore {v}": "V-Restore",
    "QK-Frozen SFT": "QK-Frozen SFT (own SFT run)",
}
# Table 4's order, as paired differences between two candidates of the same run
ORDER = [("+Restore {q}", "+Restore {k}"), ("+Restore {k}", "+Restore {v}"),
         ("+Restore {q}", "+Restore {v}"), ("+QK-Restore", "+Restore {q}"),
         ("+QK-Restore", "+QK-Pro (R=1)")]  # fmt: skip


def run_metrics(model: dict, lengths: list[int]) -> dict[str, float]:
    """Recall per length and its mean over lengths, CoT answer and whole-trace accuracy."""
    rec = {f"recall@{L}": model["recall"][str(L)] for L in lengths}
    return {
        **rec,
        "recall (mean)": sum(rec.values()) / len(rec),
        "CoT answer": model["reasoning"]["answer"],
        "CoT trace": model["reasoning"]["trace"],
    }


def _paired_cell(diffs: list[float]) -> str:
    if not diffs:
        return "–"
    iv = t_interval(diffs)
    return f"{iv.text()} ({iv.wins}/{iv.losses})"


def paired_table(runs: list[dict], base: str = "+SFT") -> list[str]:
    """Pooled paired contrasts: per run, candidate − ``base`` of the same run; over the runs, the
    mean difference with a Student-t 95 % interval and (runs better/worse). The runs are pooled as
    draws of one configuration (a seed reruns to different numbers on a GPU, so it is not a unit);
    then Table 4's order as paired differences between candidates."""
    lengths = runs[0]["config"]["lengths"]
    have = [r for r in runs if base in r.get("models", {})]
    if not have:
        return []
    cols = list(run_metrics(have[0]["models"][base], lengths))
    head = "| candidate − " + base + " | " + " | ".join(cols) + " | n |"
    sep = "|---" * (len(cols) + 2) + "|"
    out = ["", f"### Paired contrasts, pooled over {len(have)} runs (points; 95 % t-interval over "
           "runs; runs better/worse)", "", head, sep]  # fmt: skip

    def rows(pairs: list[tuple[str, str, str]]) -> list[str]:
        lines = []
        for a, b, label in pairs:
            both = [r for r in have if a in r["models"] and b in r["models"]]
            if not both:
                continue
            diffs = {c: [run_metrics(r["models"][a], lengths)[c]
                         - run_metrics(r["models"][b], lengths)[c] for r in both] for c in cols}  # fmt: skip
            lines.append(f"| {label} | " + " | ".join(_paired_cell(diffs[c]) for c in cols)
                         + f" | {len(both)} |")  # fmt: skip
        return lines

    out += rows([(k, base, v) for k, v in PAIRED.items()])
    located = [(r, (r.get("located") or {}).get(base, {})) for r in have]
    groups = list(dict.fromkeys(g for _, loc in located for g in loc))
    if groups:
        out += ["", f"#### PRE's parameter group put back into {base} (`--locate`) − {base}", "",
                head.replace("candidate", "group put back"), sep]  # fmt: skip
        for g in groups:
            both = [(r, loc[g]) for r, loc in located if g in loc]
            diffs = {c: [loc["recall"][c.split("@")[1]] - r["models"][base]["recall"][c.split("@")[1]]
                         for r, loc in both] for c in cols if c.startswith("recall@")}  # fmt: skip
            mean_d = [sum(loc["recall"][str(L)] - r["models"][base]["recall"][str(L)]
                          for L in lengths) / len(lengths) for r, loc in both]  # fmt: skip
            cells = [_paired_cell(diffs[c]) if c in diffs else _paired_cell(mean_d)
                     if c == "recall (mean)" else "not measured" for c in cols]  # fmt: skip
            out.append(f"| {g} | " + " | ".join(cells) + f" | {len(both)} |")
    out += ["", "#### Table 4's order, paired within runs", "",
            head.replace("candidate − " + base, "contrast"), sep]  # fmt: skip
    out += rows([(a, b, f"{PAIRED[a]} − {PAIRED[b]}") for a, b in ORDER])
    return out


def curve_table(runs: list[dict], lengths: list[int]) -> list[str]:
    curves = [{p["step"]: p for p in (r["sft"].get("curve") or [])} for r in runs]
    steps = sorted({s for c in curves for s in c})
    if not steps:
        return []
    lines = ["", "### Along SFT", "", "| SFT step | " + " | ".join(f"recall@{L}" for L in lengths)
             + " | CoT answer | n |", "|---" * (len(lengths) + 3) + "|"]  # fmt: skip
    for s in steps:
        ps = [c.get(s) for c in curves]
        recs = [cell(p["recall"][str(L)] if p else None for p in ps) for L in lengths]
        n = sum(p is not None for p in ps)
        lines.append(f"| {s} | " + " | ".join(recs) + f" | {cell(p['cot'] if p else None for p in ps)} | {n} |")  # fmt: skip
    return lines


def curve_rows(res: dict) -> list[str]:
    """One run's SFT curve, with +QK-Restore's recall beside +SFT's where it was measured."""
    lengths = res["config"]["lengths"]
    head = "| SFT step | " + " | ".join(f"recall@{L} SFT / QK-Restore" for L in lengths)
    lines = ["", head + " | CoT answer |", "|---" * (len(lengths) + 2) + "|"]
    for p in res["sft"]["curve"]:
        qk = p.get("recall_qk_restored") or {}
        cells = [
            f"{100 * p['recall'][str(L)]:.1f} / "
            + (f"{100 * qk[str(L)]:.1f}" if str(L) in qk else "–")
            for L in lengths
        ]
        lines.append(f"| {p['step']} | " + " | ".join(cells) + f" | {100 * p['cot']:.1f} |")
    return lines


def drift_table(runs: list[dict]) -> list[str]:
    layers = sorted({x["layer"] for r in runs for x in (r.get("drift") or {}).get("layers", [])})
    if not layers:
        return []
    lines = ["", "### Weight drift PRE → +SFT (relative, `qkrestore drift`)", "",
             "| layer | W_Q | W_K | W_V | W_O | routing Q_hᵀK_g (mean over heads) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for i in layers:
        ls = [next((x for x in (r.get("drift") or {}).get("layers", []) if x["layer"] == i), None)
              for r in runs]  # fmt: skip

        def g(k: str, ls: list = ls) -> str:
            return cell((((x or {}).get(k) or {}).get("rel_drift") for x in ls), scale=1, digits=3)

        routing = cell((((x or {}).get("routing_drift") or {}).get("mean") for x in ls), scale=1,
                       digits=3)  # fmt: skip
        lines.append(f"| {i} | {g('q')} | {g('k')} | {g('v')} | {g('o')} | {routing} |")
    return lines


def attn_table(runs: list[dict]) -> list[str]:
    found = [r.get("attn_distance") for r in runs if r.get("attn_distance")]
    if not found:
        return []
    names = ["PRE", "+SFT", "+QK-Restore"]
    lines = ["", "### Mean attention distance (tokens, `qkrestore attn-distance`)", "",
             "| layer | " + " | ".join(names) + " | heads whose D fell PRE→SFT (sum) |",
             "|---|---|---|---|---|"]  # fmt: skip
    layers = sorted({x["layer"] for a in found for x in a["models"][0]["layers"]})
    for i in layers:
        ds = []
        for k in range(len(names)):
            vals = []
            for a in found:
                if k < len(a["models"]):
                    vals += [x["mean"] for x in a["models"][k]["layers"] if x["layer"] == i]
            ds.append(cell(vals, scale=1, digits=1))
        fell = [(x["fell"], x["heads"]) for a in found for x in (a.get("comparisons") or [{}])[0]
                .get("layers", []) if x["layer"] == i]  # fmt: skip
        fell_s = f"{sum(f for f, _ in fell)}/{sum(h for _, h in fell)}" if fell else "–"
        lines.append(f"| {i} | " + " | ".join(ds) + f" | {fell_s} |")
    return lines


def tau_table(runs: list[dict]) -> list[str]:
    rows = []
    for r in runs:
        ac = (r.get("autocorr") or {}).get("cot") or {}
        rows.append((r["seed"], (r.get("setup") or {}).get("cot_tau"), ac.get("tau")))
    if not any(t for _, _, t in rows):
        return []
    lines = ["", "### Decay length τ of the CoT traces (`qkrestore autocorr`)", "",
             "| seed | τ = −1/ln λ₂ (by construction) | τ measured | ratio |", "|---|---|---|---|"]  # fmt: skip
    for seed, want, got in rows:
        ratio = f"{got / want:.3f}" if want and got else "–"
        w = f"{want:.2f}" if want else "–"
        g = f"{got:.2f}" if got else "–"
        lines.append(f"| {seed} | {w} | {g} | {ratio} |")
    return lines


def figure(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = runs[0]["config"]["lengths"]
    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(14, 4))
    names = [k for k in STYLE if any(k in r["models"] for r in runs)]
    for name in names:
        color, ls = STYLE[name]
        per_len = [stats(r["models"][name]["recall"][str(L)] for r in runs if name in r["models"])
                   for L in lengths]  # fmt: skip
        ax.plot(lengths, [100 * s[0] for s in per_len], color=color, linestyle=ls, marker="o",
                ms=3, label=name)  # fmt: skip
        ax.fill_between(lengths, [100 * s[2] for s in per_len], [100 * s[3] for s in per_len],
                        color=color, alpha=0.12)  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_ylim(-3, 103)
    ax.set_xlabel("context length")
    ax.set_ylabel("needle recall (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    bars = [k for k in [*MAIN, *TABLE4] if any(k in r["models"] for r in runs)]
    st = [stats(r["models"][k]["reasoning"]["answer"] for r in runs if k in r["models"])
          for k in bars]  # fmt: skip
    bx.bar(range(len(bars)), [100 * s[0] for s in st],
           yerr=[[100 * (s[0] - s[2]) for s in st], [100 * (s[3] - s[0]) for s in st]],
           color=[STYLE.get(k, ("tab:gray", ""))[0] for k in bars], capsize=3)  # fmt: skip
    bx.set_xticks(range(len(bars)), bars, rotation=40, ha="right", fontsize=7)
    bx.set_ylim(0, 103)
    bx.set_ylabel("CoT answer accuracy (%)")
    bx.grid(alpha=0.3, axis="y")
    curves = [{p["step"]: p for p in (r["sft"].get("curve") or [])} for r in runs]
    steps = sorted({s for c in curves for s in c})
    if steps:
        series = [
            (f"recall@{L}", lambda p, L=L: p["recall"][str(L)]) for L in (lengths[0], lengths[-1])
        ]
        series.append(("CoT answer", lambda p: p["cot"]))
        for (label, get), color in zip(series, ["tab:cyan", "tab:red", "black"], strict=True):
            st = [stats(get(c[s]) for c in curves if s in c) for s in steps]
            cx.plot(steps, [100 * x[0] for x in st], marker="o", ms=3, color=color, label=label)
            cx.fill_between(steps, [100 * x[2] for x in st], [100 * x[3] for x in st],
                            color=color, alpha=0.12)  # fmt: skip
        cx.set_xlabel("SFT step")
        cx.set_ylim(-3, 103)
        cx.grid(alpha=0.3)
        cx.legend(fontsize=7)
        cx.set_title("along SFT", fontsize=9)
    fig.suptitle(f"analog setup: mean over {len(runs)} seeds (band / bars: min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("agg"))
    ap.add_argument("--paired", action="store_true",
                    help="only the pooled paired contrasts (candidate − +SFT of the same run)")  # fmt: skip
    ap.add_argument("--curves", action="store_true",
                    help="only the SFT curves, one panel per run (agg.png), and their table")  # fmt: skip
    args = ap.parse_args(argv)
    runs = [load(r) for r in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.paired:
        Path(f"{args.out}.md").write_text("\n".join(paired_table(runs)).lstrip() + "\n")
        print(f"wrote {args.out}.md")
        return 0
    if args.curves:
        lines = []
        for res in runs:
            lines += [f"## run {res['seed']}", *curve_rows(res), ""]
        Path(f"{args.out}.md").write_text("\n".join(lines))
        curve_figure(runs, Path(f"{args.out}.png"))
        print(f"wrote {args.out}.md and {args.out}.png")
        return 0
    Path(f"{args.out}.md").write_text(table(runs))
    figure(runs, Path(f"{args.out}.png"))
    print(f"wrote {args.out}.md and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
