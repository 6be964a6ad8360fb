"""Tiny bases and PEFT adapters built with peft itself, and an independent reference for them.

The reference never calls qkrestore: POST is PRE + the original adapter merged by peft's own
``merge_and_unload``; the restored model is that, with PRE's routing rows put back by state-dict
surgery, the rows being the test's own reading of each family (conftest / the family tests).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from conftest import TINY, quiet_transformers

DENSE = {"num_hidden_layers": 2, "head_dim": 16}


def build_base(root: Path, model_type: str, kwargs: dict, seed: int = 0) -> Path:
    """PRE: a tiny random float32 model saved with transformers' own classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **(TINY | kwargs)))
    pre = root / "pre"
    model.save_pretrained(pre)
    return pre


def load_base(pre: Path):
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(pre, dtype=torch.float32)


def build_adapter(pre: Path, out: Path, seed: int = 1, scale: float = 0.05, **lora) -> Path:
    """A LoRA adapter made by peft on PRE, with B (and DoRA's magnitude) set to random values."""
    from peft import LoraConfig, get_peft_model

    model = load_base(pre)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name or "embed_tokens.base_layer" in name:
                # Saved whole by peft (a targeted embedding is saved with the adapter).
                p.add_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    return out


def merged_state(pre: Path, adapter: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PRE + adapter merged by peft, and the warnings peft gave while loading the adapter."""
    from peft import PeftModel

    model = load_base(pre)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
    merged = peft_model.merge_and_unload()
    state = {k: v.detach().clone() for k, v in merged.state_dict().items()}
    return state, [str(w.message) for w in caught]


def with_pre_rows(
    state: dict[str, torch.Tensor], pre_state: dict[str, torch.Tensor], rows: dict[str, list]
) -> dict[str, torch.Tensor]:
    """State-dict surgery: ``rows`` of each named tensor taken from PRE."""
    out = dict(state)
    for name, ranges in rows.items():
        t = out[name].clone()
        for r0, r1 in ranges:
            t[r0:r1] = pre_state[name][r0:r1]
        out[name] = t
    return out


def base_state(pre: Path) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in load_base(pre).state_dict().items()}


def missing_key_warnings(messages: list[str]) -> list[str]:
    return [m for m in messages if "missing" in m.lower() and "key" in m.lower()]


def gated_q_rows(heads: int, hd: int) -> list[tuple[int, int]]:
    """Qwen3-Next's q_proj: per head, ``hd`` query rows then ``hd`` gate rows."""
    return [(j * 2 * hd, j * 2 * hd + hd) for j in range(heads)]


def assert_state(
    got: dict[str, torch.Tensor],
    want: dict[str, torch.Tensor],
    pre_state: dict[str, torch.Tensor],
    rows: dict[str, list],
    *,
    exact_rows: bool = True,
    rtol: float = 1e-6,
) -> None:
    """Routing rows equal PRE's (exactly unless DoRA), every other value equals the reference."""
    assert set(got) == set(want)
    assert set(rows) <= set(got), sorted(set(rows) - set(got))
    for name, t in got.items():
        mask = torch.zeros(t.shape[0] if t.dim() else 1, dtype=torch.bool)
        for r0, r1 in rows.get(name, ()):
            r1 = min(r1, t.shape[0])
            if exact_rows:
                assert torch.equal(t[r0:r1], pre_state[name][r0:r1]), f"{name}[{r0}:{r1}] != PRE"
            else:
                torch.testing.assert_close(t[r0:r1], pre_state[name][r0:r1], rtol=rtol, atol=1e-6)
            mask[r0:r1] = True
        if t.dim() == 0:
            torch.testing.assert_close(t, want[name])
            continue
        torch.testing.assert_close(t[~mask], want[name][~mask], rtol=rtol, atol=1e-6, msg=name)
