"""Recall probe (exact match of the needle value) and reasoning accuracy (greedy CoT)."""

from __future__ import annotations

import numpy as np
import torch
from data import ANS, EOS, Markov, cot_example, haystack_batch


@torch.no_grad()
def recall(
    model, markov: Markov, lengths: list[int], *, n_docs: int, batch: int, needles_per_1k: float,
    n_queries: int, seed: int, device: torch.device,
) -> dict[int, float]:  # fmt: skip
    """Per context length: fraction of queries whose two value tokens are both predicted (argmax;
    equal to greedy decoding since v2 is only counted when v1 is right). Queried needles sit in the
    first half of the context. Same documents for every model (fixed seed)."""
    out = {}
    for L in lengths:
        rng = np.random.default_rng(seed + L)
        hits = total = 0
        for start in range(0, n_docs, batch):
            b = min(batch, n_docs - start)
            n_needles = n_needles_for(L, needles_per_1k)
            n_q = min(n_queries, n_needles)
            ids, ans = haystack_batch(rng, markov, b, L, n_needles, n_q, far=True)
            x = torch.from_numpy(ids).to(device)
            pred = model(input_ids=x).logits.argmax(-1).cpu().numpy()
            rows = np.arange(b)[:, None, None]
            ok = (pred[rows, ans - 1] == ids[rows, ans]).all(-1)
            hits += int(ok.sum())
            total += ok.size
        out[L] = hits / total
    return out


def load(path: str, device: torch.device):
    """A saved checkpoint, float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()


def run_recall(
    model, markov: Markov, cfg: dict, seed: int, device: torch.device
) -> dict[str, float]:
    """The recall probe as a run of size ``cfg`` measures it (``sizes.resolve``), keyed by length."""
    rec = recall(
        model, markov, cfg["lengths"], n_docs=cfg["eval_docs"], batch=cfg["eval_batch"],
        needles_per_1k=cfg["needles_per_1k"], n_queries=cfg["n_queries"], seed=10_000 + seed,
        device=device,
    )  # fmt: skip
    return {str(k): v for k, v in rec.items()}


def n_needles_for(length: int, per_1k: float) -> int:
    return max(2, round(length * per_1k / 1000))


@torch.no_grad()
def reasoning(
    model, *, n_problems: int, n_min: int, n_max: int, seed: int, device: torch.device,
    task=None,
) -> dict[str, float]:  # fmt: skip
    """Greedy generation from the prompt; ``answer``: the token after the first ANS is the sum mod
    10; ``trace``: the whole generated trace equals the reference. ``task``: an object with
    ``example(rng, n) -> (prompt, response)`` (``markov_cot.MarkovCoT``); None: the first setup's
    running sums of digits."""
    rng = np.random.default_rng(seed)
    ans_ok = trace_ok = 0
    per_n = max(1, n_problems // (n_max - n_min + 1))
    total = 0
    for n in range(n_min, n_max + 1):
        if task is None:
            exs = [cot_example(d) for d in rng.integers(0, 10, (per_n, n))]
        else:
            exs = [task.example(rng, n) for _ in range(per_n)]
        prompts = torch.tensor([p for p, _ in exs], device=device)
        max_new = len(exs[0][1]) + 2
        seq = prompts
        for _ in range(max_new):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        gen = seq[:, prompts.shape[1] :].cpu().numpy()
        for g, (_, ref) in zip(gen, exs, strict=True):
            g = list(g)
            if EOS in g:
                g = g[: g.index(EOS) + 1]
            trace_ok += g == ref
            if ANS in g and g.index(ANS) + 1 < len(g):
                ans_ok += g[g.index(ANS) + 1] == ref[-2]
        total += per_n
    return {"answer": ans_ok / total, "trace": trace_ok / total}
