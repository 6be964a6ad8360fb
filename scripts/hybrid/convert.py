"""Convert a Llama checkpoint (SmolLM2-135M-Instruct) into a Qwen3.5-text softmax/linear hybrid.

Why Qwen3.5-text: it is the family of the paper's target models (Qwen3-Next / Qwen3.5: gated
DeltaNet layers with a softmax layer every fourth), qkrestore plans it by ``layer_types`` with its
gated ``q_proj`` (query rows restored, gate rows kept), its MLP is dense, and gated DeltaNet has
the same four projections as attention (q, k, v, o), so the linear layers start from the weights of
the attention they replace. See docs/reproduce-hybrid.md for what is exact and what is not.

What each tensor of the hybrid is:

* embeddings, MLPs (gate/up/down): the source's tensors, byte for byte;
* RMSNorm weights: Qwen3.5's RMSNorm multiplies by ``1 + w`` (Llama's by ``w``), so ``w - 1`` is
  stored; computed in float32, it is exact when the output dtype is float32 (``1 + (w - 1) == w`` for
  every weight in [0.5, 2]), and rounded once to bfloat16 otherwise;
* full-attention layers: k_proj, v_proj the source's; q_proj holds, per head, the source's query
  rows followed by zero gate rows (sigmoid(0) = 1/2), and o_proj is twice the source's (exact in any
  binary float), so the gated output equals the source's; q_norm/k_norm (which Llama lacks, and
  Qwen3.5 applies per head) are set so that ``1 + w`` is the mean RMS of the source's query/key heads
  on calibration text, which keeps the logits' average scale;
* linear (gated DeltaNet) layers: ``in_proj_qkv`` = [W_Q; W_K; W_V] with the key/value heads
  repeated to the query heads (9 DeltaNet heads of 64 for SmolLM2), ``out_proj`` = W_O, the short
  convolution an identity (last tap 1), ``in_proj_a``/``in_proj_b`` zero (so beta = 1/2 and the decay
  is the per-head constant from ``A_log = 0`` and ``dt_bias``, half-lives spread log-uniformly from
  ``--min-half-life`` to ``--max-half-life`` tokens), ``in_proj_z`` (the output gate) seeded normal
  with the source's ``initializer_range``, the gated norm's weight ones (or, with
  ``--output-scales``, the layer's least-squares output scale against the attention it replaces).

Run: ``python scripts/hybrid/convert.py SRC OUT [--full-layers 3,7,...] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Files of the source folder that are not weights or config: tokenizer, chat template, generation
# defaults. Copied byte for byte so the hybrid is a drop-in for the source in any pipeline.
SKIP_SUFFIXES = (".safetensors", ".bin", ".pth", ".gguf", ".pt")
SKIP_NAMES = {"config.json", "model.safetensors.index.json", "README.md", "qkrestore.json"}

LIN, FULL = "linear_attention", "full_attention"


# -- planning (pure) ----------------------------------------------------------------------------


def default_full_layers(n_layers: int, interval: int = 4) -> list[int]:
    """Qwen3-Next's pattern: every ``interval``-th layer is softmax (3, 7, 11, … for 4)."""
    return [i for i in range(n_layers) if (i + 1) % interval == 0]


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``3,7,11`` or ``every:4`` into a sorted list of layer indices inside the model."""
    text = text.strip()
    if text.startswith("every:"):
        return default_full_layers(n_layers, int(text.split(":", 1)[1]))
    out = sorted({int(t) for t in text.split(",") if t.strip()})
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad or not out:
        raise ValueError(f"--full-layers {text!r}: need indices in 0..{n_layers - 1}")
    return out


def rope_theta(cfg: dict[str, Any]) -> float:
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta"))
    if theta is None:
        raise ValueError("source config.json has no rope_theta")
    if (rp.get("rope_type") or "default") != "default" or cfg.get("rope_scaling"):
        raise ValueError("source uses rope scaling; only default RoPE converts exactly")
    return float(theta)


def hybrid_config_dict(src: dict[str, Any], full_layers: Sequence[int]) -> dict[str, Any]:
    """The Qwen3.5-text config fields for a Llama config: same sizes, ``layer_types`` from
    ``full_layers``, DeltaNet heads equal to the attention's query heads."""
    if src.get("model_type") != "llama":
        raise ValueError(f"source model_type is {src.get('model_type')!r}, expected 'llama'")
    if src.get("attention_bias") or src.get("mlp_bias"):
        raise ValueError("source has attention or MLP biases; Qwen3.5 has none")
    n = int(src["num_hidden_layers"])
    heads = int(src["num_attention_heads"])
    kv = int(src.get("num_key_value_heads") or heads)
    hd = int(src.get("head_dim") or src["hidden_size"] // heads)
    if heads % kv:
        raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")
    full = set(full_layers)
    return {
        "vocab_size": src["vocab_size"],
        "hidden_size": src["hidden_size"],
        "intermediate_size": src["intermediate_size"],
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "hidden_act": src.get("hidden_act", "silu"),
        "max_position_embeddings": src["max_position_embeddings"],
        "initializer_range": src.get("initializer_range", 0.02),
        "rms_norm_eps": src.get("rms_norm_eps", 1e-5),
        "tie_word_embeddings": bool(src.get("tie_word_embeddings", False)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": rope_theta(src),
            "partial_rotary_factor": 1.0,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": hd,
        "linear_value_head_dim": hd,
        "linear_num_key_heads": heads,
        "linear_num_value_heads": heads,
        "layer_types": [FULL if i in full else LIN for i in range(n)],
        "pad_token_id": src.get("pad_token_id"),
        "bos_token_id": src.get("bos_token_id"),
        "eos_token_id": src.get("eos_token_id"),
    }


def half_lives(heads: int, lo: float, hi: float) -> list[float]:
    """Per-head half-lives in tokens, log-uniform from ``lo`` to ``hi``."""
    if heads == 1:
        return [math.sqrt(lo * hi)]
    return [lo * (hi / lo) ** (h / (heads - 1)) for h in range(heads)]


def dt_bias_for(half_life: float) -> float:
    """``dt_bias`` so that exp(g) = 2**(-1/half_life) with A_log = 0 and a = 0:
    g = -softplus(dt_bias), so dt_bias = softplus⁻¹(ln 2 / half_life)."""
    x = math.log(2.0) / half_life
    return math.log(math.expm1(x))


def repeat_heads(w: torch.Tensor, kv: int, heads: int, hd: int) -> torch.Tensor:
    """K/V rows of ``kv`` heads repeated so head ``h`` gets kv head ``h // (heads // kv)`` (GQA)."""
    return w.view(kv, hd, -1).repeat_interleave(heads // kv, dim=0).reshape(heads * hd, -1)


def gated_q(wq: torch.Tensor, heads: int, hd: int) -> torch.Tensor:
    """Qwen3.5's q_proj: per head, the ``hd`` query rows then ``hd`` gate rows (here zero)."""
    q = wq.view(heads, hd, -1)
    return torch.cat([q, torch.zeros_like(q)], dim=1).reshape(2 * heads * hd, -1)


def convert_state(
    src: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    *,
    qk_rms: dict[int, tuple[float, float]] | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    min_half_life: float = 8.0,
    max_half_life: float = 2048.0,
) -> dict[str, torch.Tensor]:
    """The hybrid's full state dict (transformers' Qwen3_5ForCausalLM names) from a Llama one.

    ``qk_rms[i] = (rms_q, rms_k)``: the mean per-head RMS of layer ``i``'s queries and keys on
    calibration text; without it the q/k norms are left at Qwen3.5's neutral 0 (scale 1).
    Tensors are cast to ``dtype`` (default: the source embedding's dtype).
    """
    n, heads, kv, hd = (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["head_dim"],
    )
    dt = dtype or src["model.embed_tokens.weight"].dtype
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def keep(name: str) -> None:  # byte for byte when the dtype does not change
        out[name] = src[name] if src[name].dtype == dt else src[name].to(dt)

    def norm(dst: str, name: str) -> None:  # Llama's w → Qwen3.5's (1 + w)
        out[dst] = (src[name].float() - 1.0).to(dt)

    keep("model.embed_tokens.weight")
    if not cfg["tie_word_embeddings"]:
        keep("lm_head.weight")
    norm("model.norm.weight", "model.norm.weight")
    lives = half_lives(heads, min_half_life, max_half_life)
    for i in range(n):
        p = f"model.layers.{i}."
        for m in ("gate_proj", "up_proj", "down_proj"):
            keep(f"{p}mlp.{m}.weight")
        norm(f"{p}input_layernorm.weight", f"{p}input_layernorm.weight")
        norm(f"{p}post_attention_layernorm.weight", f"{p}post_attention_layernorm.weight")
        wq, wk, wv, wo = (src[f"{p}self_attn.{x}_proj.weight"] for x in "qkvo")
        if cfg["layer_types"][i] == FULL:
            a = f"{p}self_attn."
            out[a + "q_proj.weight"] = gated_q(wq, heads, hd).to(dt)
            out[a + "k_proj.weight"] = wk.to(dt)
            out[a + "v_proj.weight"] = wv.to(dt)
            out[a + "o_proj.weight"] = (wo.float() * 2.0).to(dt)
            rq, rk = (qk_rms or {}).get(i, (1.0, 1.0))
            out[a + "q_norm.weight"] = torch.full((hd,), rq - 1.0).to(dt)
            out[a + "k_norm.weight"] = torch.full((hd,), rk - 1.0).to(dt)
        else:
            a = f"{p}linear_attn."
            qkv = torch.cat([wq, repeat_heads(wk, kv, heads, hd), repeat_heads(wv, kv, heads, hd)])
            out[a + "in_proj_qkv.weight"] = qkv.to(dt)
            out[a + "out_proj.weight"] = wo.to(dt)
            conv = torch.zeros(qkv.shape[0], 1, cfg["linear_conv_kernel_dim"])
            conv[:, 0, -1] = 1.0
            out[a + "conv1d.weight"] = conv.to(dt)
            hidden = cfg["hidden_size"]
            z = torch.randn(heads * hd, hidden, generator=gen) * cfg["initializer_range"]
            out[a + "in_proj_z.weight"] = z.to(dt)
            out[a + "in_proj_a.weight"] = torch.zeros(heads, hidden, dtype=dt)
            out[a + "in_proj_b.weight"] = torch.zeros(heads, hidden, dtype=dt)
            out[a + "A_log"] = torch.zeros(heads, dtype=dt)
            out[a + "dt_bias"] = torch.tensor([dt_bias_for(h) for h in lives]).to(dt)
            out[a + "norm.weight"] = torch.ones(hd, dtype=dt)
    return out


# -- calibration (needs the source model) -------------------------------------------------------


@torch.no_grad()
def calibrate_qk(model: Any, input_ids: torch.Tensor) -> dict[int, tuple[float, float]]:
    """Mean per-head RMS of each layer's query and key projections (before RoPE) on ``input_ids``.

    Qwen3.5 normalises each query/key head to RMS 1 and scales by ``1 + w``; setting ``1 + w`` to
    this mean keeps the attention logits at the source's average scale.
    """
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sums: dict[tuple[int, str], list[float]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for side in ("q", "k"):
            mod = getattr(layer.self_attn, f"{side}_proj")

            def hook(
                _m: Any, _inp: Any, out: torch.Tensor, key: tuple[int, str] = (i, side)
            ) -> None:
                rms = out.float().view(*out.shape[:-1], -1, hd).pow(2).mean(-1).sqrt()
                acc = sums.setdefault(key, [0.0, 0.0])
                acc[0] += float(rms.sum())
                acc[1] += rms.numel()

            hooks.append(mod.register_forward_hook(hook))
    try:
        model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    n = len(model.model.layers)
    return {
        i: (sums[(i, "q")][0] / sums[(i, "q")][1], sums[(i, "k")][0] / sums[(i, "k")][1])
        for i in range(n)
    }


@torch.no_grad()
def output_scales(teacher: Any, hybrid: Any, input_ids: torch.Tensor) -> dict[int, float]:
    """Least-squares scale of each DeltaNet layer's output against the attention it replaces.

    On ``input_ids``, each DeltaNet mixer gets the teacher's attention input of its layer;
    ``alpha = <y, t> / <y, y>`` is the scalar that brings its output ``y`` closest to the teacher's
    attention output ``t``. Multiplying the gated norm's weight by it (it scales the output
    linearly) makes each new layer start no worse, in that sense, than leaving it out: a layer
    whose output does not correlate with its target starts near silent instead of adding noise
    to the residual stream.
    """
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(teacher.model.layers):

        def pre(_m: Any, args: tuple, kwargs: dict, i: int = i) -> None:
            inputs[i] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

        def post(_m: Any, _a: Any, out: Any, i: int = i) -> None:
            outputs[i] = out[0] if isinstance(out, tuple) else out

        hooks.append(layer.self_attn.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(layer.self_attn.register_forward_hook(post))
    try:
        teacher.model(input_ids=input_ids)
    finally:
        for h in hooks:
            h.remove()
    scales = {}
    for i, layer in enumerate(hybrid.model.layers):
        if hasattr(layer, "linear_attn"):
            y = layer.linear_attn(hidden_states=inputs[i].float()).float()
            t = outputs[i].float()
            scales[i] = float((y * t).sum() / (y * y).sum().clamp_min(1e-30))
    return scales


# -- I/O ----------------------------------------------------------------------------------------


def read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(folder / f)))
        return state
    return load_file(str(folder / "model.safetensors"))


def calibration_ids(tokenizer: Any, n_tokens: int) -> torch.Tensor:
    """A fixed English passage (this package's own docs when present) cut to ``n_tokens``."""
    here = Path(__file__).resolve().parents[2]
    text = ""
    for name in ("README.md", "docs/design.md", "docs/reproduce.md"):
        f = here / name
        if f.exists():
            text += f.read_text(encoding="utf-8") + "\n"
    if not text:
        text = "The quick brown fox jumps over the lazy dog. " * 200
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :n_tokens]
    return ids


def build_model(cfg_dict: dict[str, Any], state: dict[str, torch.Tensor]) -> Any:
    """The transformers model holding ``state`` exactly (strict load, nothing left to random init)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    cfg = Qwen3_5TextConfig(**cfg_dict)
    cfg.architectures = ["Qwen3_5ForCausalLM"]
    dtype = state["model.embed_tokens.weight"].dtype
    with torch.device("meta"):
        model = Qwen3_5ForCausalLM(cfg)
    model.load_state_dict(state, strict=False, assign=True)
    missing = [
        n
        for n, p in model.named_parameters()
        if p.is_meta and not (cfg.tie_word_embeddings and n == "lm_head.weight")
    ]
    if missing:
        raise ValueError(f"conversion left parameters unset: {missing[:4]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (RoPE frequencies) were made on meta: rebuild them on the CPU.
    rot = model.model.rotary_emb
    fresh = type(rot)(config=cfg)
    rot.inv_freq = fresh.inv_freq
    rot.original_inv_freq = fresh.original_inv_freq
    model.config.dtype = dtype
    return model


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in SKIP_NAMES and not f.name.endswith(SKIP_SUFFIXES):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def convert(
    src: Path,
    dst: Path,
    *,
    full_layers: Sequence[int] | None = None,
    dtype: str = "auto",
    calib_tokens: int = 2048,
    calib_ids: torch.Tensor | None = None,
    calibrate_outputs: bool = False,
    seed: int = 0,
    min_half_life: float = 8.0,
    max_half_life: float = 2048.0,
) -> dict[str, Any]:
    """Write the hybrid to ``dst`` and return a record of what was done.

    The q/k norms are calibrated on ``calib_ids`` when given, else on ``calib_tokens`` tokens of
    fixed text when the source has a tokenizer, else left neutral; on the same tokens, with
    ``calibrate_outputs``, each DeltaNet layer's output gets its least-squares scale
    (:func:`output_scales`). That is off by default: on SmolLM2 it made the converted model's
    held-out perplexity worse (106 180 against 90 391 without it, on 1 022 tokens), since a near
    silent layer removes the attention the rest of the network relies on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    src_cfg = json.loads((src / "config.json").read_text())
    n = int(src_cfg["num_hidden_layers"])
    full = list(full_layers) if full_layers is not None else default_full_layers(n)
    cfg = hybrid_config_dict(src_cfg, full)
    state = read_state(src)
    qk_rms = None
    scales: dict[int, float] = {}
    has_tok = any(f.name.startswith("tokenizer") for f in src.iterdir())
    if calib_ids is None and calib_tokens > 0 and has_tok:
        calib_ids = calibration_ids(AutoTokenizer.from_pretrained(src), calib_tokens)
    out_dtype = (
        state["model.embed_tokens.weight"].dtype if dtype == "auto" else getattr(torch, dtype)
    )
    teacher = None
    if calib_ids is not None:
        teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        qk_rms = calibrate_qk(teacher, calib_ids)
    # Built in float32 first, so calibration and every value computed here round once, at the end.
    hstate = convert_state(
        state,
        cfg,
        qk_rms=qk_rms,
        dtype=torch.float32,
        seed=seed,
        min_half_life=min_half_life,
        max_half_life=max_half_life,
    )
    model = build_model(cfg, hstate)
    if teacher is not None and calib_ids is not None and calibrate_outputs:
        scales = output_scales(teacher, model, calib_ids)
        with torch.no_grad():
            for i, a in scales.items():
                model.model.layers[i].linear_attn.norm.weight.mul_(a)
    del teacher
    model.to(out_dtype)
    model.config.dtype = out_dtype
    if dst.exists():
        shutil.rmtree(dst)
    model.save_pretrained(dst)
    side = copy_side_files(src, dst)
    record = {
        "source": str(src),
        "family": "qwen3_5_text",
        "full_attention_layers": full,
        "dtype": str(out_dtype).removeprefix("torch."),
        "qk_rms": {str(k): list(v) for k, v in (qk_rms or {}).items() if k in full},
        "output_scales": {str(k): v for k, v in scales.items()},
        "half_lives": half_lives(cfg["num_attention_heads"], min_half_life, max_half_life),
        "side_files": side,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (dst / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "src", type=Path, help="Llama model folder (config.json, safetensors, tokenizer)"
    )
    ap.add_argument("out", type=Path, help="output folder (replaced)")
    ap.add_argument("--full-layers", default="every:4", help="'every:K' or a list like 3,7,11")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--calib-tokens", type=int, default=2048, help="0: no q/k norm calibration")
    ap.add_argument(
        "--output-scales",
        action="store_true",
        help="scale each DeltaNet layer's output by its least-squares fit (off: it measured worse)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-half-life", type=float, default=8.0)
    ap.add_argument("--max-half-life", type=float, default=2048.0)
    a = ap.parse_args(argv)
    n = int(json.loads((a.src / "config.json").read_text())["num_hidden_layers"])
    rec = convert(
        a.src,
        a.out,
        full_layers=parse_layers(a.full_layers, n),
        dtype=a.dtype,
        calib_tokens=a.calib_tokens,
        calibrate_outputs=a.output_scales,
        seed=a.seed,
        min_half_life=a.min_half_life,
        max_half_life=a.max_half_life,
    )
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
