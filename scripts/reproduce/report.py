"""Markdown report (Table-1 style) and figure."""

from __future__ import annotations

from pathlib import Path


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, m in models.items():
        lengths = [int(k) for k in m["recall"]]
        ax1.plot(lengths, [100 * m["recall"][str(k)] for k in lengths], marker="o", label=name)
    ax1.set_xscale("log", base=2)
    ax1.set_xlabel("context length (tokens)")
    ax1.set_ylabel("needle recall, exact match (%)")
    ax1.set_ylim(-3, 103)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    names = list(models)
    ax2.bar(range(len(names)), [100 * models[n]["reasoning"]["answer"] for n in names])
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax2.set_ylabel("CoT arithmetic accuracy (%)")
    ax2.set_ylim(0, 103)
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(f"QK-Restore reproduction ({results['size']}, seed {results['seed']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def drift_lines(drift: dict | None) -> list[str]:
    if not drift:
        return ["(drift not available)"]
    lines = [
        "| layer | kind | rel. drift W_Q | rel. drift W_K | rel. drift W_V | rel. drift W_O |",
        "|---|---|---|---|---|---|",
    ]
    for layer in drift.get("layers", []):

        def g(k: str, layer: dict = layer) -> str:
            v = (layer.get(k) or {}).get("rel_drift")
            return "-" if v is None else f"{v:.3f}"

        lines.append(
            f"| {layer['layer']} | {layer.get('kind')} | {g('q')} | {g('k')} | {g('v')} | {g('o')} |"
        )
    return lines


def write(results: dict, out: Path, figure: str, drift_figure: str | None) -> Path:
    models = results["models"]
    lengths = results["config"]["lengths"]
    head = (
        "| model | "
        + " | ".join(f"recall@{L}" for L in lengths)
        + " | recall avg | CoT answer acc | CoT trace exact |"
    )
    sep = "|---" * (len(lengths) + 4) + "|"
    rows = [head, sep]
    for name, m in models.items():
        rec = [m["recall"][str(L)] for L in lengths]
        rows.append(
            f"| {name} | " + " | ".join(_pct(r) for r in rec)
            + f" | {_pct(sum(rec) / len(rec))} | {_pct(m['reasoning']['answer'])} | {_pct(m['reasoning']['trace'])} |"
        )  # fmt: skip
    cfg = results["config"]
    lines = [
        f"# QK-Restore reproduction ({results['size']})",
        "",
        f"Device: {results['device']}; total wall time {results['wall_seconds']:.0f} s; seed {results['seed']}.",
        "",
        "Recall = exact match (both value tokens) of needle values queried at the end of a context of the "
        "given length, queried needles in the first half of the context; "
        f"{cfg['eval_docs']} documents x {cfg['n_queries']} queries per length. "
        "CoT accuracy = greedy step-by-step generation of a running sum mod 10 of "
        f"{cfg['cot_digits'][0]}-{cfg['cot_digits'][1]} digits; *answer* = the final token is right, "
        "*trace* = the whole trace is right. All numbers in %.",
        "",
        *rows,
        "",
        f"![recall and reasoning]({figure})",
        "",
        "## Training",
        "",
        f"- model: `qwen3_5_text`, {results['params'] / 1e6:.1f} M parameters, layer types "
        f"{results['layer_types']}",
        f"- pre-training: {results['pretrain']}",
        f"- CoT-SFT: {results['sft']}",
        f"- longer CoT-SFT (continues +SFT; `+SFT-long` rows): {results.get('sft_long')}",
        f"- config: `{cfg}`",
        "",
        "## Weight drift PRE -> +SFT (`qkrestore drift`)",
        "",
        *drift_lines(results.get("drift")),
        "",
    ]
    if drift_figure:
        lines += [f"![drift]({drift_figure})", ""]
    lines += ["## Commands", "", "```bash", *results["commands"], "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
