#!/usr/bin/env python
"""One table and one figure over several reproduction runs (e.g. those of parallel.sh).

    python scripts/reproduce/summary.py RUN_DIR [RUN_DIR ...] --out summary

writes ``summary.md`` (recall per length and CoT accuracy of every model of every run, with the
run's seed and SFT learning rate) and ``summary.png`` (recall against context length of +SFT and
its repairs, one panel per run; CoT answer accuracy beside it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the models drawn in the figure, and how
STYLE = {
    "PRE": ("black", "-"),
    "+SFT": ("tab:red", "-"),
    "+QK-Restore": ("tab:green", "--"),
    "+QK-Pro (R=1)": ("tab:blue", ":"),
    "+Restore {q,k,v,o}": ("tab:purple", "-."),
    "+SFT-long": ("tab:orange", "-"),
    "+SFT-long +QK-Restore": ("tab:olive", "--"),
}


def load(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    res["name"] = run.name
    return res


def label(res: dict) -> str:
    sft = res["sft"]
    return f"{res['name']} (seed {res['seed']}, SFT lr {sft['lr']:g})"


def table(runs: list[dict]) -> str:
    lengths = runs[0]["config"]["lengths"]
    head = "| run | model | " + " | ".join(f"recall@{L}" for L in lengths)
    head += " | CoT answer | CoT trace |"
    lines = [head, "|---" * (len(lengths) + 4) + "|"]
    for res in runs:
        for name, m in res["models"].items():
            rec = " | ".join(f"{100 * m['recall'][str(L)]:.1f}" for L in lengths)
            rea = m["reasoning"]
            lines.append(
                f"| {label(res)} | {name} | {rec} | {100 * rea['answer']:.1f} "
                f"| {100 * rea['trace']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def figure(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(3.1 * n, 5.6), squeeze=False)
    for col, res in enumerate(runs):
        ax, bx = axes[0, col], axes[1, col]
        lengths = res["config"]["lengths"]
        for name, m in res["models"].items():
            if name not in STYLE:
                continue
            color, ls = STYLE[name]
            ax.plot(lengths, [100 * m["recall"][str(L)] for L in lengths], color=color,
                    linestyle=ls, marker="o", ms=3, label=name)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_ylim(-3, 103)
        ax.set_title(label(res), fontsize=8)
        ax.set_xlabel("context length", fontsize=8)
        ax.grid(alpha=0.3)
        names = [k for k in res["models"] if k in STYLE]
        bx.bar(range(len(names)), [100 * res["models"][k]["reasoning"]["answer"] for k in names],
               color=[STYLE[k][0] for k in names])  # fmt: skip
        bx.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
        bx.set_ylim(0, 103)
        bx.grid(alpha=0.3, axis="y")
        if col == 0:
            ax.set_ylabel("needle recall (%)")
            bx.set_ylabel("CoT answer accuracy (%)")
    handles, labels = [], []
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("summary"))
    args = ap.parse_args(argv)
    runs = [load(r) for r in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.md").write_text(table(runs))
    figure(runs, Path(f"{args.out}.png"))
    print(f"wrote {args.out}.md and {args.out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
