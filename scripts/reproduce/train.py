"""Model construction and the two training stages (pre-training, CoT-SFT)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

MODEL_DIMS: dict[str, dict] = {
    # 22.5 M parameters, 8 layers, full attention at 3 and 7
    "gpu": dict(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, head_dim=64, linear_num_key_heads=4, linear_num_value_heads=8,
        linear_key_head_dim=32, linear_value_head_dim=32, full_attention_interval=4,
    ),
    # 0.7 M parameters, 4 layers, full attention at 1 and 3: learns recall on 2 CPU cores in minutes
    "cpu": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, full_attention_interval=2,
    ),
    # 0.2 M parameters, 4 layers, full attention at 3: the CI smoke test
    "toy": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, full_attention_interval=4,
    ),
}  # fmt: skip


def build_model(vocab_size: int, size: str, seed: int, tied: bool = True):
    """A Qwen3.5-text hybrid (gated-DeltaNet linear layers + a few full-attention layers).
    ``tied``: one matrix for the input embeddings and the output layer (the first setup); the
    paper's models have them untied (the analog setup)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = MODEL_DIMS[size]
    cfg = AutoConfig.for_model(
        "qwen3_5_text",
        vocab_size=vocab_size,
        linear_conv_kernel_dim=4,
        max_position_embeddings=8192,
        hidden_act="silu",
        tie_word_embeddings=tied,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **dims,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, focus: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy over the labelled tokens (-100 = ignored), plus, when ``focus`` (a
    bool mask over label positions) is given, the mean loss of the focused tokens once more.

    Pre-training focuses the needle answers: they are ~2 % of a haystack document's tokens, and
    without the extra term their gradient is drowned by the filler's, so recall is learned only
    after a long plateau (the first GPU run never left it)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    per_tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    ).view_as(target)
    valid = target != -100
    loss = per_tok[valid].mean()
    if focus is not None:
        f = focus[:, 1:] & valid
        if f.any():
            loss = loss + per_tok[f].mean()
    return loss


def train(
    model,
    batch_fn: Callable[[int, float], tuple[torch.Tensor, ...]],
    *,
    steps: int,
    lr: float,
    seconds: float | None = None,
    warmup: int = 50,
    log: Callable[[str], None] = print,
    name: str = "train",
    amp: bool = False,
    probe: Callable[[torch.nn.Module], str] | None = None,
    log_every: float = 30.0,
    curve: Callable[[torch.nn.Module], dict] | None = None,
    curve_every: int = 0,
    after_step: Callable[[], None] | None = None,
) -> dict:
    """AdamW, linear warm-up, cosine decay to lr/10 over ``steps`` or ``seconds`` of wall time, whichever
    runs out first (training stops there). ``batch_fn(i, progress)`` (progress in [0, 1], by the
    same rule, so data can follow a curriculum) gives ``(ids, labels)`` or
    ``(ids, labels, focus)`` (see ``lm_loss``). ``amp``: bfloat16 autocast (CUDA); the weights and
    the optimizer stay float32. Progress is logged every tenth of ``steps`` and every ``log_every``
    seconds, with ``probe(model)``'s text (e.g. a quick recall check) when given.

    ``curve``: measured on the model before the first step and after every ``curve_every`` steps
    and the last one; the results, each with its ``step``, are returned as ``info["curve"]``
    (recall and CoT along SFT, counted in steps so that runs on different machines compare).
    ``after_step``: called after every optimizer step (e.g. to hold some rows fixed)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = min(warmup, max(1, steps // 10))

    def progress(i: int, skip: int = 0) -> float:
        """Share of training done, by steps (past the first ``skip``) or time, whichever is
        further."""
        p = (i - skip) / max(1, steps - skip)
        if seconds is not None:
            p = max(p, (time.time() - t0) / seconds)
        return min(1.0, p)

    def lr_at(i: int) -> float:
        if i < warmup:
            return lr * (i + 1) / warmup
        cos = 0.5 * (1 + math.cos(math.pi * progress(i, warmup)))
        return lr * (0.1 + 0.9 * cos)  # floor: lr / 10

    points: list[dict] = []

    def measure_curve(step: int) -> None:
        if curve is None or curve_every <= 0:
            return
        model.eval()
        point = {"step": step, **curve(model)}
        model.train()
        points.append(point)
        log(f"[{name}] curve at step {step}: {point}")

    model.train()
    measure_curve(0)
    t0, losses, done = time.time(), [], 0
    t_log = t0
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(i)
        ids, labels, *focus = batch_fn(i, progress(i))
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(input_ids=ids).logits
        loss = lm_loss(logits, labels, focus[0] if focus else None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        done = i + 1
        if curve_every > 0 and (done % curve_every == 0 or done == steps):
            measure_curve(done)
        if i % max(1, steps // 10) == 0 or i == steps - 1 or time.time() - t_log > log_every:
            t_log = time.time()
            extra = ""
            if probe is not None:
                model.eval()
                extra = " " + probe(model)
                model.train()
            log(
                f"[{name}] step {i}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s){extra}"
            )
        if seconds is not None and time.time() - t0 > seconds:
            log(f"[{name}] time budget {seconds:.0f}s reached at step {done}/{steps}")
            break
    model.eval()
    info = {"steps": done, "planned_steps": steps, "seconds": round(time.time() - t0, 1),
            "final_loss": float(sum(losses[-10:]) / len(losses[-10:]))}  # fmt: skip
    if points:
        info["curve"] = points
    return info
