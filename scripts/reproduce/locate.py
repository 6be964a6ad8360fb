#!/usr/bin/env python
"""Where does SFT's damage to recall live? Put one group of PRE's parameters back into POST at a
time and measure recall again.

QK-Restore bets that the damage sits in the routing parameters (W_Q, W_K) of the softmax layers.
When it does not bring recall back, this tells where else to look: embeddings, the linear-attention
layers, the softmax layers' output gate or V/O, the MLPs or the norms. It is in-memory state-dict
surgery on the loaded models (an analysis, not a checkpoint the tool writes). The group
"QK-Restore set" is the rows the tool restores, so its recall should equal +QK-Restore's.

    python scripts/reproduce/locate.py runs/cpu/ckpt/pre runs/cpu/ckpt/sft --size cpu
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Group:
    """Tensors whose names match ``pattern``; of a gated ``q_proj`` (Qwen3.5: per head,
    ``head_dim`` query rows then ``head_dim`` output-gate rows) only the ``q_rows`` half."""

    pattern: str
    q_rows: str = "all"  # "all", "query" or "gate"


QPROJ = r"\.self_attn\.q_proj\."
GROUPS: dict[str, Group] = {
    "embeddings": Group(r"embed_tokens|lm_head"),
    "linear-attention layers": Group(r"\.linear_attn\."),
    "QK-Restore set (W_Q query rows, W_K, q/k norms)": Group(
        r"\.self_attn\.(q_proj|k_proj|q_norm|k_norm)\.", q_rows="query"
    ),
    "softmax output gate (q_proj gate rows)": Group(QPROJ, q_rows="gate"),
    "softmax W_V, W_O": Group(r"\.self_attn\.(v_proj|o_proj)\."),
    "MLPs": Group(r"\.mlp\."),
    "layer norms": Group(r"layernorm|^model\.norm\."),
    # combinations that the single groups above called for
    "everything but the embeddings": Group(r"^(?!.*(embed_tokens|lm_head))"),
    "embeddings + linear-attention layers": Group(r"embed_tokens|lm_head|\.linear_attn\."),
    "embeddings + QK-Restore set": Group(
        r"embed_tokens|lm_head|\.self_attn\.(q_proj|k_proj|q_norm|k_norm)\.", q_rows="query"
    ),
}


def row_mask(name: str, rows: int, group: Group, head_dim: int) -> torch.Tensor | None:
    """Bool mask of the rows of ``name`` that ``group`` takes, or None for the whole tensor."""
    if group.q_rows == "all" or not re.search(QPROJ, name):
        return None
    per_head = torch.arange(rows) % (2 * head_dim) < head_dim  # query rows of each head
    return per_head if group.q_rows == "query" else ~per_head


def swap(
    post: torch.nn.Module, source: dict[str, torch.Tensor], masks: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """Copy ``source``'s values (the masked rows) into ``post`` in place; return POST's old
    values of those tensors, whole."""
    params = post.state_dict(keep_vars=True)  # both names of tied tensors
    # all saved before any is written: two names of one tied tensor must both save POST's values
    saved = {n: params[n].detach().clone() for n in masks}
    with torch.no_grad():
        for n, mask in masks.items():
            if mask is None:
                params[n].copy_(source[n])
            else:
                params[n][mask] = source[n][mask].to(params[n].dtype)
    return saved


def locate(
    pre: torch.nn.Module,
    post: torch.nn.Module,
    measure: Callable[[torch.nn.Module], dict[str, float]],
    head_dim: int,
    groups: dict[str, Group] = GROUPS,
) -> dict[str, dict]:
    """``{group: {"tensors": n, "recall": measure(POST with that group from PRE)}}``; POST is left
    as it was."""
    pre_state = pre.state_dict()
    out = {}
    for name, group in groups.items():
        masks = {
            k: row_mask(k, v.shape[0], group, head_dim)
            for k, v in pre_state.items()
            if re.search(group.pattern, k)
        }
        if not masks:
            continue
        saved = swap(post, pre_state, masks)
        try:
            out[name] = {"tensors": len(masks), "recall": measure(post)}
        finally:
            swap(post, saved, dict.fromkeys(masks))
    return out


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import data
    import evaluate
    import run

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("pre", type=Path)
    ap.add_argument("post", type=Path)
    ap.add_argument("--size", choices=sorted(run.SIZES), default="cpu", help="run.py size used")
    ap.add_argument("--seed", type=int, default=0, help="run.py seed used (the probe's documents)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    cfg = run.SIZES[args.size]
    dev = torch.device(args.device)
    markov = data.Markov(data.Vocab(**cfg["vocab"]), seed=1234)

    def measure(m) -> dict[str, float]:
        return evaluate.run_recall(m, markov, cfg, args.seed, dev)

    pre, post = evaluate.load(str(args.pre), dev), evaluate.load(str(args.post), dev)
    print(f"POST as it is: recall {measure(post)}")
    for group, r in locate(pre, post, measure, pre.config.head_dim).items():
        print(f"with PRE's {group} ({r['tensors']} tensors): recall {r['recall']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
