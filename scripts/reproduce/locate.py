"""Where does SFT's damage to recall live? Put one group of PRE's parameters back into POST at a
time and measure recall again.

QK-Restore bets that the damage sits in the routing parameters (W_Q, W_K) of the softmax layers.
When it does not bring recall back, this tells where else to look: embeddings, the linear-attention
layers, the softmax layers' V/O, the MLPs or the norms. It is in-memory state-dict surgery on the
loaded models (an analysis, not a checkpoint the tool writes).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

# parameter groups of a Qwen3.5-text model, by name (tied lm_head = embed_tokens)
GROUPS: dict[str, str] = {
    "embeddings": r"embed_tokens|lm_head",
    "linear-attention layers": r"\.linear_attn\.",
    "softmax W_Q, W_K, q/k norms": r"\.self_attn\.(q_proj|k_proj|q_norm|k_norm)\.",
    "softmax W_V, W_O": r"\.self_attn\.(v_proj|o_proj)\.",
    "MLPs": r"\.mlp\.",
    "layer norms": r"layernorm|^model\.norm\.",
}


def group_names(state: dict[str, torch.Tensor], pattern: str) -> list[str]:
    return [k for k in state if re.search(pattern, k)]


def swap_in(
    post: torch.nn.Module, pre_state: dict[str, torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """Copy PRE's values of ``names`` into ``post`` in place; return POST's old values."""
    params = post.state_dict(keep_vars=True)  # both names of tied tensors
    saved = {}
    with torch.no_grad():
        for n in names:
            saved[n] = params[n].detach().clone()
            params[n].copy_(pre_state[n])
    return saved


def locate(
    pre: torch.nn.Module,
    post: torch.nn.Module,
    measure: Callable[[torch.nn.Module], dict[int, float]],
    groups: dict[str, str] = GROUPS,
) -> dict[str, dict]:
    """``{group: {"tensors": n, "recall": measure(POST with that group from PRE)}}``; POST is left
    as it was."""
    pre_state = pre.state_dict()
    out = {}
    for group, pattern in groups.items():
        names = group_names(pre_state, pattern)
        if not names:
            continue
        saved = swap_in(post, pre_state, names)
        try:
            out[group] = {"tensors": len(names), "recall": measure(post)}
        finally:
            swap_in(post, saved, names)
    return out
