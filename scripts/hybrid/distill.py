"""Distil the converted hybrid from its Llama teacher (SmolLM2-135M-Instruct), in two stages.

1. **Attention transfer** (layer-local hidden-state matching, as LoLCATs/RADLADS do): one teacher
   forward records, for every layer, the attention's input (after the input norm) and its output;
   each student token mixer (DeltaNet, or the softmax layer with its new q/k norms) is trained to
   map the former to the latter, relative MSE summed over layers. Every layer learns at once from
   exact inputs, so no error compounds, and no logits or MLPs are back-propagated: the cheapest way
   to bring 22 new layers near their targets.
2. **End-to-end KL** on the logits (temperature 1, KL(teacher ‖ student) per token), plus
   ``--hidden-weight`` × the relative MSE of every layer's output hidden state.

Trainable by default: the DeltaNet layers and the softmax layers' q/k norms (parameters the
teacher does not have); ``--stage2-all`` also trains everything else in stage 2. Embeddings, MLPs,
norms and the softmax layers' projections then stay the converted values, so W_Q/W_K of the softmax
layers are SmolLM2's own: the routing qkrestore restores.

Each stage stops at ``--*-steps`` or ``--*-seconds``, whichever comes first (the learning rate
follows a cosine over that budget); ``distill.json`` records steps, tokens, wall and GPU time, the
losses, and the KL on a fixed held-out batch before and after.

Run: ``python scripts/hybrid/distill.py TEACHER HYBRID OUT [--seq-len 2048 --batch 8 ...]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import PROMPTS, batches, build_corpus, teacher_samples


@dataclass
class StageConfig:
    steps: int
    seconds: float
    lr: float
    warmup: int = 10


def trainable_names(model: Any, everything: bool) -> list[str]:
    """DeltaNet layers and softmax q/k norms; with ``everything``, all parameters."""
    names = []
    for n, _ in model.named_parameters():
        if everything or ".linear_attn." in n or n.endswith(("q_norm.weight", "k_norm.weight")):
            names.append(n)
    return names


def set_trainable(model: Any, names: Sequence[str]) -> list[torch.nn.Parameter]:
    keep = set(names)
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        if n in keep:
            params.append(p)
    return params


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) at temperature 1, in float32."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).mean() / b.float().pow(2).mean().clamp_min(1e-12)


class AttentionTaps:
    """Forward hooks on the teacher's attention modules: their input hidden states and output."""

    def __init__(self, teacher: Any) -> None:
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(teacher.model.layers):
            self.handles.append(
                layer.self_attn.register_forward_pre_hook(self._pre(i), with_kwargs=True)
            )
            self.handles.append(layer.self_attn.register_forward_hook(self._post(i)))

    def _pre(self, i: int) -> Callable[..., None]:
        def hook(_m: Any, args: tuple, kwargs: dict) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[i] = x.detach()

        return hook

    def _post(self, i: int) -> Callable[..., None]:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            self.outputs[i] = (out[0] if isinstance(out, tuple) else out).detach()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def mixer_loss(student: Any, taps: AttentionTaps, position_ids: torch.Tensor) -> torch.Tensor:
    """Stage 1: sum over layers of the relative MSE between each student mixer's output on the
    teacher's attention input and the teacher's attention output."""
    layers = student.model.layers
    pe = None
    total = torch.zeros((), device=position_ids.device)
    for i, layer in enumerate(layers):
        x, target = taps.inputs[i], taps.outputs[i]
        if hasattr(layer, "linear_attn"):
            y = layer.linear_attn(hidden_states=x)
        else:
            if pe is None:
                pe = student.model.rotary_emb(x, position_ids)
            y = layer.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
        total = total + rel_mse(y, target)
    return total / len(layers)


def lr_at(cfg: StageConfig, step: int, elapsed: float) -> float:
    """Linear warm-up, then a cosine to zero over whichever budget (steps or seconds) ends first."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, max(step / max(cfg.steps, 1), elapsed / max(cfg.seconds, 1e-9)))
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def eval_kl(teacher: Any, student: Any, batch: torch.Tensor, device: torch.device) -> float:
    student.eval()
    with autocast(device):
        t = teacher(input_ids=batch).logits
        s = student(input_ids=batch).logits
    student.train()
    return float(kl_per_token(t, s))


def run_stage(
    stage: int,
    teacher: Any,
    student: Any,
    data: Iterator[torch.Tensor],
    cfg: StageConfig,
    params: list[torch.nn.Parameter],
    device: torch.device,
    *,
    hidden_weight: float = 0.0,
    log: Callable[[str], None] = lambda s: None,
    log_every: int = 10,
) -> dict[str, Any]:
    """One stage; returns steps, tokens, seconds (wall, synchronised) and the loss curve."""
    if cfg.steps <= 0 or cfg.seconds <= 0:
        return {"steps": 0, "tokens": 0, "seconds": 0.0, "losses": []}
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    taps = AttentionTaps(teacher) if stage == 1 else None
    losses: list[tuple[int, float]] = []
    tokens = 0
    sync(device)
    t0 = time.perf_counter()
    step = 0
    try:
        while step < cfg.steps:
            elapsed = time.perf_counter() - t0
            if elapsed >= cfg.seconds:
                break
            batch = next(data).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step, elapsed)
            with autocast(device):
                if stage == 1:
                    assert taps is not None
                    with torch.no_grad():
                        teacher.model(input_ids=batch)
                    pos = (
                        torch.arange(batch.shape[1], device=device)
                        .unsqueeze(0)
                        .expand(batch.shape[0], -1)
                    )
                    loss = mixer_loss(student, taps, pos)
                else:
                    want_h = hidden_weight > 0
                    with torch.no_grad():
                        tout = teacher(input_ids=batch, output_hidden_states=want_h)
                    sout = student(input_ids=batch, output_hidden_states=want_h)
                    loss = kl_per_token(tout.logits, sout.logits)
                    if want_h:
                        hs = [
                            rel_mse(a, b)
                            for a, b in zip(sout.hidden_states[1:], tout.hidden_states[1:])
                        ]
                        loss = loss + hidden_weight * torch.stack(hs).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            tokens += batch.numel()
            step += 1
            if step % log_every == 0 or step == 1:
                losses.append((step, float(loss.detach())))
                log(
                    f"stage {stage} step {step} loss {losses[-1][1]:.4f} {time.perf_counter() - t0:.1f}s"
                )
    finally:
        if taps is not None:
            taps.remove()
    sync(device)
    return {
        "steps": step,
        "tokens": tokens,
        "seconds": round(time.perf_counter() - t0, 3),
        "losses": losses,
    }


def load_pair(teacher_dir: Path, hybrid_dir: Path, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    teacher: Any = AutoModelForCausalLM.from_pretrained(teacher_dir, **kw)
    student: Any = AutoModelForCausalLM.from_pretrained(hybrid_dir, **kw)
    teacher.to(device)
    student.to(device)
    teacher.eval().requires_grad_(False)
    student.train()
    return teacher, student


def distill(
    teacher: Any,
    student: Any,
    train: torch.Tensor,
    eval_batch: torch.Tensor,
    *,
    seq_len: int,
    batch: int,
    stage1: StageConfig,
    stage2: StageConfig,
    stage2_all: bool = False,
    hidden_weight: float = 0.0,
    seed: int = 0,
    device: torch.device | None = None,
    log: Callable[[str], None] = lambda s: None,
    log_every: int = 10,
) -> dict[str, Any]:
    """Both stages on windows of the ``train`` token stream; the student is changed in place."""
    device = device or torch.device("cpu")
    torch.manual_seed(seed)
    eval_batch = eval_batch.to(device)
    kl0 = eval_kl(teacher, student, eval_batch, device)
    log(f"held-out KL before: {kl0:.4f}")
    data = batches(train, seq_len, batch, seed)
    p1 = set_trainable(student, trainable_names(student, False))
    r1 = run_stage(1, teacher, student, data, stage1, p1, device, log=log, log_every=log_every)
    kl1 = eval_kl(teacher, student, eval_batch, device)
    log(f"held-out KL after stage 1: {kl1:.4f}")
    p2 = set_trainable(student, trainable_names(student, stage2_all))
    r2 = run_stage(
        2,
        teacher,
        student,
        data,
        stage2,
        p2,
        device,
        hidden_weight=hidden_weight,
        log=log,
        log_every=log_every,
    )
    kl2 = eval_kl(teacher, student, eval_batch, device)
    log(f"held-out KL after stage 2: {kl2:.4f}")
    student.requires_grad_(False)
    return {
        "kl_before": kl0,
        "kl_after_stage1": kl1,
        "kl_after": kl2,
        "stage1": {**asdict(stage1), **r1, "trainable_params": sum(p.numel() for p in p1)},
        "stage2": {
            **asdict(stage2),
            **r2,
            "trainable_params": sum(p.numel() for p in p2),
            "all": stage2_all,
            "hidden_weight": hidden_weight,
        },
        "tokens": r1["tokens"] + r2["tokens"],
        "seconds": r1["seconds"] + r2["seconds"],
        "seq_len": seq_len,
        "batch": batch,
        "seed": seed,
    }


def save_student(student: Any, hybrid_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """Save in ``dtype`` with the converted folder's side files (tokenizer, chat template, ...)."""
    if out.exists():
        shutil.rmtree(out)
    student.to(dtype=dtype).cpu().save_pretrained(out)
    for f in sorted(hybrid_dir.iterdir()):
        if f.is_file() and not (out / f.name).exists() and not f.name.endswith(".safetensors"):
            shutil.copy2(f, out / f.name)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from qkrestore.io.runtime import quiet_transformers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", type=Path)
    ap.add_argument("hybrid", type=Path, help="folder written by convert.py")
    ap.add_argument("out", type=Path, help="distilled hybrid (replaced); distill.json inside")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--stage1-steps", type=int, default=100000)
    ap.add_argument("--stage1-seconds", type=float, default=60.0)
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument("--stage2-steps", type=int, default=100000)
    ap.add_argument("--stage2-seconds", type=float, default=120.0)
    ap.add_argument("--stage2-lr", type=float, default=3e-4)
    ap.add_argument("--stage2-all", action="store_true", help="stage 2 trains every parameter")
    ap.add_argument("--hidden-weight", type=float, default=0.0)
    ap.add_argument(
        "--train-tokens", type=int, default=20_000_000, help="corpus size (cycled if shorter)"
    )
    ap.add_argument("--held-out-tokens", type=int, default=65536)
    ap.add_argument("--generated", type=int, default=0, help="teacher samples added to the corpus")
    ap.add_argument("--generated-tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args(argv)

    quiet_transformers()
    device = torch.device(
        "cuda"
        if a.device == "auto" and torch.cuda.is_available()
        else ("cpu" if a.device == "auto" else a.device)
    )
    t_start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.teacher)
    teacher, student = load_pair(a.teacher, a.hybrid, device)
    extra: list[str] = []
    t_gen = time.perf_counter()
    if a.generated:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.generated)]
        extra = teacher_samples(
            teacher, tok, prompts, max_new_tokens=a.generated_tokens, seed=a.seed, device=device
        )
    t_gen = time.perf_counter() - t_gen
    corpus = build_corpus(
        tok, train_tokens=a.train_tokens, held_out_tokens=a.held_out_tokens, extra_texts=extra
    )
    ho = corpus.held_out
    eval_batch = ho[: (ho.numel() // a.seq_len) * a.seq_len].view(-1, a.seq_len)[:4]
    if eval_batch.numel() == 0:
        eval_batch = ho[: min(ho.numel(), 512)].view(1, -1)
    rec = distill(
        teacher,
        student,
        corpus.train,
        eval_batch,
        seq_len=a.seq_len,
        batch=a.batch,
        stage1=StageConfig(a.stage1_steps, a.stage1_seconds, a.stage1_lr),
        stage2=StageConfig(a.stage2_steps, a.stage2_seconds, a.stage2_lr),
        stage2_all=a.stage2_all,
        hidden_weight=a.hidden_weight,
        seed=a.seed,
        device=device,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    save_student(student, a.hybrid, a.out, getattr(torch, a.save_dtype))
    rec.update(
        {
            "teacher": str(a.teacher),
            "hybrid": str(a.hybrid),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "corpus": corpus.record,
            "generation_seconds": round(t_gen, 2),
            "gpu_seconds": rec["seconds"] if device.type == "cuda" else 0.0,
            "total_seconds": round(time.perf_counter() - t_start, 2),
        }
    )
    (a.out / "distill.json").write_text(json.dumps(rec, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in rec.items() if k not in ("stage1", "stage2", "corpus")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
