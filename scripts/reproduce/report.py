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
        "| layer | kind | rel. drift W_Q | W_K | W_V | W_O | routing form Q_hᵀK_g (mean / max) "
        "| key-subspace angle (mean / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layer in drift.get("layers", []):

        def g(k: str, layer: dict = layer) -> str:
            v = (layer.get(k) or {}).get("rel_drift")
            return "-" if v is None else f"{v:.3f}"

        rd = layer.get("routing_drift") or {}
        ks = (layer.get("k_subspace") or {}).get("layer") or {}
        routing = f"{rd['mean']:.3f} / {rd['max']:.3f}" if "mean" in rd else "-"
        angle = f"{ks['mean_deg']:.1f}° / {ks['max_deg']:.1f}°" if "mean_deg" in ks else "-"
        lines.append(
            f"| {layer['layer']} | {layer.get('kind')} | {g('q')} | {g('k')} | {g('v')} | {g('o')} "
            f"| {routing} | {angle} |"
        )
    return lines


def attn_lines(attn: dict | None) -> list[str]:
    """Mean attention distance per softmax layer for each model, and the fell/rose counts."""
    if not attn:
        return ["(attn-distance not available)"]
    names = ["PRE", "POST", "POST +QK-Restore"][: len(attn["models"])]
    head = "| layer | " + " | ".join(f"D ({n})" for n in names)
    head += " | heads whose D fell PRE→POST | rose POST→restored |"
    lines = [head, "|---" * (len(names) + 3) + "|"]
    means = [{x["layer"]: x["mean"] for x in m["layers"]} for m in attn["models"]]
    # first comparison PRE->POST counts "fell", second POST->restored counts "rose"
    counts = [
        {x["layer"]: f"{x[key]}/{x['heads']}" for x in comp["layers"]}
        for comp, key in zip(attn.get("comparisons", []), ("fell", "rose"))
    ]
    counts += [{}] * (2 - len(counts))
    for i in means[0]:
        ds = ["-" if m.get(i) is None else f"{m[i]:.1f}" for m in means]
        lines.append(f"| {i} | " + " | ".join([*ds, *(c.get(i, "-") for c in counts)]) + " |")
    return lines


def autocorr_lines(autocorr: dict | None) -> list[str]:
    if not autocorr:
        return ["(autocorr not available)"]
    lines = ["| corpus | tokens | ρ(1) | ρ(8) | decay length τ (tokens) |", "|---|---|---|---|---|"]
    for name, r in autocorr.items():
        if not r:
            lines.append(f"| {name} | - | - | - | - |")
            continue
        rho = r["rho"]
        r1 = "-" if not rho or rho[0] is None else f"{rho[0]:.3f}"
        r8 = f"{rho[7]:.3f}" if len(rho) >= 8 and rho[7] is not None else "-"
        tau = "-" if r.get("tau") is None else f"{r['tau']:.1f}"
        lines.append(f"| {name} | {r['tokens']:,} | {r1} | {r8} | {tau} |")
    return lines


def located_lines(located: dict | None, lengths: list[int]) -> list[str]:
    """Recall of +SFT (and +SFT-long) with one group of PRE's parameters put back (--locate)."""
    if not located:
        return []
    lines = [
        "## Where the damage lives (`--locate`: one group of PRE's parameters put back)",
        "",
        "| model | PRE's group put back | tensors | "
        + " | ".join(f"recall@{L}" for L in lengths)
        + " |",
        "|---" * (len(lengths) + 3) + "|",
    ]
    for model, groups in located.items():
        for group, r in groups.items():
            rec = " | ".join(_pct(r["recall"][str(L)]) for L in lengths)
            lines.append(f"| {model} | {group} | {r['tensors']} | {rec} |")
    return [*lines, ""]


def curve_lines(sft: dict | None, lengths: list[int]) -> list[str]:
    """Recall and CoT measured along SFT (``--curve-every``)."""
    if not sft or not sft.get("curve"):
        return []
    lines = [
        "## Along SFT (recall on a quarter of the probe's documents, CoT on a third of its problems)",
        "",
        "| SFT step | " + " | ".join(f"recall@{L}" for L in lengths) + " | CoT answer |",
        "|---" * (len(lengths) + 2) + "|",
    ]
    for p in sft["curve"]:
        rec = " | ".join(_pct(p["recall"][str(L)]) for L in lengths)
        lines.append(f"| {p['step']} | {rec} | {_pct(p['cot'])} |")
    return [*lines, ""]


def ablation_lines(ablations: dict | None, lengths: list[int]) -> list[str]:
    """PRE's recall with parts zeroed (``--ablate``)."""
    if not ablations:
        return []
    lines = [
        "## Which layers carry recall (`--ablate`: parts of PRE zeroed)",
        "",
        "| model | zeroed | tensors | " + " | ".join(f"recall@{L}" for L in lengths) + " |",
        "|---" * (len(lengths) + 3) + "|",
    ]
    for model, rows in ablations.items():
        for label, r in rows.items():
            rec = " | ".join(_pct(r["recall"][str(L)]) for L in lengths)
            lines.append(f"| {model} | {label} | {r['tensors']} | {rec} |")
    return [*lines, ""]


def setup_lines(setup: dict | None) -> list[str]:
    if not setup:
        return []
    return [f"Setup: `{setup}`.", ""]


def write(results: dict, out: Path, figure: str) -> Path:
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

    def fig(name: str, alt: str) -> list[str]:
        return [f"![{alt}]({name}.png)", ""] if (out / f"{name}.png").exists() else []

    lines = [
        f"# QK-Restore reproduction ({results['size']})",
        "",
        f"Device: {results['device']}; total wall time {results['wall_seconds']:.0f} s; seed {results['seed']}.",
        "",
        *setup_lines(results.get("setup")),
        "Recall = exact match (both value tokens) of needle values queried at the end of a context of the "
        "given length, queried needles in the first half of the context; "
        f"{cfg['eval_docs']} documents x {cfg['n_queries']} queries per length "
        f"(chance {100 / cfg['vocab']['n_vals'] ** 2:.2g} %). "
        + (
            "CoT accuracy = greedy generation of the whole-vocabulary Markov traces (markov_cot.py) "
            f"of {cfg['cot_digits'][0]}-{cfg['cot_digits'][1]} steps; "
            if cfg.get("cot_task") == "markov"
            else "CoT accuracy = greedy step-by-step generation of a running sum mod 10 of "
            f"{cfg['cot_digits'][0]}-{cfg['cot_digits'][1]} digits; "
        )
        + "*answer* = the final token is right, "
        "*trace* = the whole trace is right. All numbers in %.",
        "",
        *rows,
        "",
        f"![recall and reasoning]({figure})",
        "",
        *curve_lines(results.get("sft"), lengths),
        *ablation_lines(results.get("ablations"), lengths),
        *located_lines(results.get("located"), lengths),
        "## Training",
        "",
        f"- model: `qwen3_5_text`, {results['params'] / 1e6:.1f} M parameters, layer types "
        f"{results['layer_types']}",
        f"- pre-training: {results['pretrain']}",
        f"- CoT-SFT: { {k: v for k, v in results['sft'].items() if k != 'curve'} }",
        f"- QK-Frozen SFT (QK-Restore's rows held at PRE's values): {results.get('sft_qk_frozen')}",
        f"- longer CoT-SFT (continues +SFT; `+SFT-long` rows): {results.get('sft_long')}",
        f"- config: `{cfg}`",
        "",
        "## Weight drift PRE -> +SFT (`qkrestore drift`)",
        "",
        *drift_lines(results.get("drift")),
        "",
        *fig("drift", "drift"),
        "## Weight drift PRE -> +SFT-long",
        "",
        *drift_lines(results.get("drift_long")),
        "",
        "## Mean attention distance (`qkrestore attn-distance`, random-token needle prompt)",
        "",
        *attn_lines(results.get("attn_distance")),
        "",
        *fig("attn-distance", "attention maps"),
        "## Token autocorrelation of the data (`qkrestore autocorr`)",
        "",
        *autocorr_lines(results.get("autocorr")),
        "",
        *fig("autocorr-pretrain", "autocorrelation, pre-training text"),
        *fig("autocorr-cot", "autocorrelation, CoT traces"),
        "## Commands",
        "",
        "```bash",
        *results["commands"],
        "```",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
