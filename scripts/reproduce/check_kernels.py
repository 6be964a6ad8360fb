#!/usr/bin/env python
"""Check that flash-linear-attention's gated-delta-rule kernel runs here and agrees with
transformers' PyTorch reference (exit 1 if not: the caller then runs without it), and that a small
Qwen3.5 model trains a step under bfloat16 autocast with it (exit 2 if not: run with --amp off).

transformers uses the ``fla`` package for Qwen3.5's gated-DeltaNet layers when it can be imported,
and falls back to a reference PyTorch loop (several times slower in training) when it cannot.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


def main() -> int:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as exc:  # not installed, or its import fails on this machine
        print(f"fla: not usable ({type(exc).__name__}: {exc})")
        return 1
    from transformers.models.qwen3_5 import modeling_qwen3_5 as q

    if not torch.cuda.is_available():
        print("fla: no CUDA device")
        return 1
    torch.manual_seed(0)
    b, t, h, d = 2, 512, 4, 32
    dev = torch.device("cuda")
    qk = torch.nn.functional.normalize(torch.randn(2, b, t, h, d, device=dev), dim=-1)
    v = torch.randn(b, t, h, d, device=dev, requires_grad=True)
    g = -torch.rand(b, t, h, device=dev)
    beta = torch.rand(b, t, h, device=dev)
    try:
        t0 = time.time()
        out, _ = chunk_gated_delta_rule(qk[0], qk[1], v, g=g, beta=beta)
        out.sum().backward()
        torch.cuda.synchronize()
        dt = time.time() - t0
        # the reference: the undecorated PyTorch function transformers falls back to
        ref_fn = getattr(q.torch_chunk_gated_delta_rule, "__wrapped__", None)
        if ref_fn is None:  # unchecked is not passed
            print("fla: transformers' PyTorch reference not found; cannot check the kernel")
            return 1
        ref, _ = ref_fn(qk[0], qk[1], v.detach(), g=g, beta=beta)
        err = (out.detach() - ref).abs().max().item()
        print(f"fla: max |fla - reference| = {err:.2e}")
        if not err < 1e-2:
            return 1
    except Exception as exc:
        print(f"fla: kernel failed ({type(exc).__name__}: {exc})")
        return 1
    print(f"fla: ok (first call incl. compile {dt:.1f}s)")
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import train

        model = train.build_model(64, "toy", 0).to(dev)
        ids = torch.randint(0, 64, (2, 128), device=dev)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        train.lm_loss(logits, ids).backward()
        torch.cuda.synchronize()
    except Exception as exc:
        print(f"bf16 autocast with fla failed ({type(exc).__name__}: {exc})")
        return 2
    print("bf16 autocast: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
