#!/usr/bin/env python
"""Where does SFT's damage to recall live? Put one group of PRE's parameters back into POST at a
time and measure recall again.

QK-Restore bets that the damage sits in the routing parameters (W_Q, W_K) of the softmax layers.
When it does not bring recall back, this tells where else to look: embeddings, the linear-attention
layers, the softmax layers' output gate or V/O, the MLPs or the norms. It is in-memory state-dict
surgery on the loaded models (an analysis, not a checkpoint the tool writes). The "QK-Restore set"
is taken from qkrestore's own plan for the pair, so its recall equals +QK-Restore's; the "output
gate" is the rest of the rows of the tensors that plan restores only in part (Qwen3.5's gated
``q_proj``).

    python scripts/reproduce/locate.py runs/cpu/ckpt/pre runs/cpu/ckpt/sft --size cpu
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

# tensor name -> row ranges taken from PRE (None: the whole tensor)
Selection = dict[str, tuple[tuple[int, int], ...] | None]

# parameter groups of a Qwen3.5-text model, by name (tied lm_head = embed_tokens)
PATTERNS: dict[str, str] = {
    "embeddings": r"embed_tokens|lm_head",
    "linear-attention layers": r"\.linear_attn\.",
    "softmax W_V, W_O": r"\.self_attn\.(v_proj|o_proj)\.",
    "MLPs": r"\.mlp\.",
    "layer norms": r"layernorm|^model\.norm\.",
}
QK_SET = "QK-Restore set (W_Q query rows, W_K, q/k norms)"
GATE = "softmax output gate (q_proj gate rows)"
GROUP_NAMES = (
    "embeddings",
    "linear-attention layers",
    QK_SET,
    GATE,
    "softmax W_V, W_O",
    "MLPs",
    "layer norms",
    # combinations that the single groups called for
    "everything but the embeddings",
    "embeddings + linear-attention layers",
    "embeddings + QK-Restore set",
)


def by_pattern(names: Iterable[str], pattern: str) -> Selection:
    return {n: None for n in names if re.search(pattern, n)}


def qk_restore_selections(pre_dir: str, post_dir: str) -> tuple[Selection, Selection]:
    """``(restored, left)``: the rows qkrestore's default plan takes from PRE, and the other rows
    of the tensors it takes only in part."""
    if str(REPO / "src") not in sys.path:
        sys.path.insert(0, str(REPO / "src"))
    from qkrestore.io.checkpoint import Checkpoint
    from qkrestore.surgery.plan import build_plan

    plan = build_plan(Checkpoint.open(pre_dir), Checkpoint.open(post_dir))
    restored: Selection = {p.name: p.rows for p in plan.patches}
    left: Selection = {}
    for p in plan.patches:
        gaps, at = [], 0
        for a, b in p.rows:
            if a > at:
                gaps.append((at, a))
            at = b
        if at < p.shape[0]:
            gaps.append((at, p.shape[0]))
        if gaps:
            left[p.name] = tuple(gaps)
    return restored, left


def default_groups(names: Iterable[str], pre_dir: str, post_dir: str) -> dict[str, Selection]:
    """Every group of ``GROUP_NAMES`` over the tensor ``names`` of a PRE/POST pair."""
    names = list(names)
    g = {k: by_pattern(names, p) for k, p in PATTERNS.items()}
    g[QK_SET], g[GATE] = qk_restore_selections(pre_dir, post_dir)
    emb = g["embeddings"]
    g["everything but the embeddings"] = {n: None for n in names if n not in emb}
    g["embeddings + linear-attention layers"] = emb | g["linear-attention layers"]
    g["embeddings + QK-Restore set"] = emb | g[QK_SET]
    return {k: g[k] for k in GROUP_NAMES}


def swap(post: torch.nn.Module, source: dict[str, torch.Tensor], sel: Selection) -> Selection:
    """Copy ``source``'s values of ``sel`` into ``post`` in place; return POST's old values of
    those tensors, whole (as a state dict to swap back)."""
    params = post.state_dict(keep_vars=True)  # both names of tied tensors
    # all saved before any is written: two names of one tied tensor must both save POST's values
    saved = {n: params[n].detach().clone() for n in sel}
    with torch.no_grad():
        for n, rows in sel.items():
            for a, b in rows or ((0, params[n].shape[0]),):
                params[n][a:b] = source[n][a:b].to(params[n].dtype)
    return saved


def locate(
    pre: torch.nn.Module,
    post: torch.nn.Module,
    measure: Callable[[torch.nn.Module], dict[str, float]],
    groups: dict[str, Selection],
) -> dict[str, dict]:
    """``{group: {"tensors": n, "recall": measure(POST with that group from PRE)}}``; POST is left
    as it was. Groups that select nothing are skipped."""
    pre_state = pre.state_dict()
    out = {}
    for name, sel in groups.items():
        if not sel:
            continue
        saved = swap(post, pre_state, sel)
        try:
            out[name] = {"tensors": len(sel), "recall": measure(post)}
        finally:
            swap(post, saved, dict.fromkeys(sel))
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import data
    import evaluate
    import sizes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("pre", type=Path)
    ap.add_argument("post", type=Path)
    ap.add_argument("--size", choices=sorted(sizes.SIZES), default="cpu", help="run.py size used")
    ap.add_argument("--setup", choices=sorted(sizes.SETUPS), default="first", help="run.py setup")
    ap.add_argument("--seed", type=int, default=0, help="run.py seed used (the probe's documents)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cfg = sizes.resolve(args.size, args.setup)
    dev = torch.device(args.device)
    markov = data.Markov(data.Vocab(**cfg["vocab"]), seed=1234)

    def measure(m) -> dict[str, float]:
        return evaluate.run_recall(m, markov, cfg, args.seed, dev)

    pre, post = evaluate.load(str(args.pre), dev), evaluate.load(str(args.post), dev)
    groups = default_groups(pre.state_dict(), str(args.pre), str(args.post))
    print(f"POST as it is: recall {measure(post)}")
    for group, r in locate(pre, post, measure, groups).items():
        print(f"with PRE's {group} ({r['tensors']} tensors): recall {r['recall']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
