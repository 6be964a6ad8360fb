"""Model-side pieces of the analog setup (``run.py --setup analog``).

* ``fix_linear_decay``: the linear-attention layers forget at a fixed rate, so that recall over
  more than a few dozen tokens can only run through the softmax layers (the paper's premise,
  its Section 3.1 and Theorem 5.1). The first setup's gated-DeltaNet layers learned their decay
  and carried a large share of the recall, so SFT's damage landed there.
* ``select_ablations`` / ``ablate``: the evidence for that premise, in the paper's leave-one-out
  form (its Appendix M): PRE with the softmax layers' W_Q zeroed, and PRE with one linear layer's
  mixer zeroed, measured by the same recall probe.
* ``RowFreezer``: QK-Frozen (the paper's Table 4), SFT with the rows QK-Restore would restore held
  at PRE's values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
from locate import Selection, swap


def softplus_inv(y: float) -> float:
    """x with softplus(x) = y (y > 0)."""
    return y + math.log(-math.expm1(-y))


def decay_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The gated-DeltaNet mixers (modules with ``A_log``, ``dt_bias`` and ``in_proj_a``)."""
    return [
        m for m in model.modules() if all(hasattr(m, a) for a in ("A_log", "dt_bias", "in_proj_a"))
    ]


def fix_linear_decay(model: torch.nn.Module, retention: float) -> int:
    """Make every linear-attention layer keep ``retention`` of its state per token, whatever the
    input, and freeze that; return how many layers were changed.

    transformers' Qwen3.5 gated DeltaNet decays its state by ``exp(g)`` per token with
    ``g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)``. With ``A_log = 0``, ``in_proj_a = 0``
    and ``dt_bias = softplus⁻¹(-ln retention)``, ``g = ln retention`` at every token and head.
    At 0.8 a token's trace in the state falls below 10⁻⁴ after 42 tokens: the short convolution and
    a few tokens of state remain, long-range memory does not. The three tensors are frozen (no
    gradient, so AdamW leaves them alone too), so PRE and every SFT model share them."""
    if not 0.0 < retention < 1.0:
        raise ValueError(f"retention {retention}: must be in (0, 1)")
    mods = decay_modules(model)
    with torch.no_grad():
        for m in mods:
            m.A_log.zero_()
            m.dt_bias.fill_(softplus_inv(-math.log(retention)))
            m.in_proj_a.weight.zero_()
            for p in (m.A_log, m.dt_bias, m.in_proj_a.weight):
                p.requires_grad_(False)
    return len(mods)


def layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def select_ablations(
    names: list[str], qk_set: Selection, layer_types: list[str]
) -> dict[str, Selection]:
    """Zeroing ablations of PRE: ``{label: rows to zero}``.

    ``qk_set`` is the QK-Restore plan's selection (``locate.qk_restore_selections``); its ``q_proj``
    rows are W_Q's query rows (Qwen3.5's gate rows stay). A linear layer's *mixer* is its whole
    token-mixing path, cut at its output projection."""
    wq = {n: rows for n, rows in qk_set.items() if n.endswith("q_proj.weight")}
    out: dict[str, Selection] = {"softmax W_Q zeroed (all softmax layers)": wq}
    softmax = sorted({i for n in wq if (i := layer_index(n)) is not None})
    if len(softmax) > 1:
        for i in softmax:
            out[f"softmax W_Q zeroed (layer {i})"] = {
                n: r for n, r in wq.items() if layer_index(n) == i
            }
    mixers = [n for n in names if re.search(r"\.linear_attn\.out_proj\.weight$", n)]
    for n in mixers:
        i = layer_index(n)
        kind = layer_types[i] if i is not None and i < len(layer_types) else "?"
        out[f"linear mixer zeroed (layer {i}, {kind})"] = {n: None}
    if mixers:
        out["linear mixers zeroed (all linear layers)"] = dict.fromkeys(mixers)
    return out


def ablate(
    model: torch.nn.Module,
    measure: Callable[[torch.nn.Module], dict[str, float]],
    ablations: dict[str, Selection],
) -> dict[str, dict]:
    """``{label: {"tensors": n, "recall": measure(model with those rows zeroed)}}``; the model is
    left as it was."""
    state = model.state_dict()
    out = {}
    for label, sel in ablations.items():
        if not sel:
            continue
        zeros = {n: torch.zeros_like(state[n]) for n in sel}
        saved = swap(model, zeros, sel)
        try:
            out[label] = {"tensors": len(sel), "recall": measure(model)}
        finally:
            swap(model, saved, dict.fromkeys(sel))
    return out


class RowFreezer:
    """Hold ``selection``'s rows of a model's parameters at their current values: call it after
    every optimizer step (``train.train(after_step=...)``). Rows, not whole tensors, because
    Qwen3.5's ``q_proj`` interleaves the query rows with output-gate rows, which QK-Restore leaves
    to POST and QK-Frozen lets train."""

    def __init__(self, model: torch.nn.Module, selection: Selection) -> None:
        params = dict(model.named_parameters())
        self.held = []
        for name, rows in selection.items():
            p = params[name]
            for a, b in rows or ((0, p.shape[0]),):
                self.held.append((p, a, b, p.detach()[a:b].clone()))

    @torch.no_grad()
    def __call__(self) -> None:
        for p, a, b, value in self.held:
            p[a:b] = value
