#!/usr/bin/env python3
"""Write a synthetic PRE/POST checkpoint pair with a real model's names, shapes and sharding.

The pair is for benchmarking ``qkrestore merge`` (see ``scripts/bench_merge.py``), not for inference:
the values are random finite bf16 numbers, but everything the merge touches is real: tensor names,
shapes, dtypes, HF-style sharding (``model-0000k-of-0000N.safetensors`` plus
``model.safetensors.index.json``) and a ``config.json`` that qkrestore's family adapters read.

Presets (dimensions from the public configs):

* ``qwen3.5-4b`` (default): Qwen3.5-4B text model, ``qwen3_5_text``: hidden 2560, MLP 9216,
  16 heads of 256 (gated ``q_proj`` of 2·16·256 rows), 4 KV heads, Gated-DeltaNet linear attention
  (``linear_attn.in_proj_qkv/in_proj_z/in_proj_b/in_proj_a/conv1d/A_log/dt_bias/norm/out_proj``) with
  a full-attention layer every 4th (layers 3, 7, 11, ...). ``lm_head`` is written untied.
* ``qwen3.5-9b``: the same family with Qwen3.5-9B's dimensions (hidden 4096, MLP 12288).
* ``qwen3-next``: Qwen3.5-9B's dimensions with Qwen3-Next's names and ``model_type`` ``qwen3_next``
  (``linear_attn.in_proj_qkvz`` and ``in_proj_ba``; dense MLP, ``num_experts`` 0).
* ``llama-8b``: Llama-3-8B, every layer global (the worst case for ``--link``).

``--size`` fixes the total: the number of layers is scaled to fit (at least 4, so that a hybrid model
has a full-attention layer), and when ``embed_tokens`` + ``lm_head`` at the real vocabulary would take
more than 40 % of the size, the vocabulary is shrunk so that they take about 20 % and absorb the
rest of the size exactly.

Data is cheap to make: one random buffer (``--buffer-mb``) is written over and over, each tensor
starting at its own offset in it. Every 16-bit word is forced to a finite bf16 with
``|x| in [2^-7, 2)`` (sign and low bits kept, exponent's high bits set to ``01111``). POST is PRE with
the lowest mantissa bit flipped, so the two differ in every element of every tensor.

Usage::

    python scripts/make_synthetic_checkpoint.py /tmp/qkbench/pair-4g --size 4GB
    python scripts/make_synthetic_checkpoint.py /tmp/qkbench/llama --preset llama-8b --size 4GB

writes ``OUT/pre`` and ``OUT/post`` and prints a summary (``--json`` for a JSON one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

BF16 = 2  # bytes per element
UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """'4GB' -> 4e9 (decimal, as HF's max_shard_size), '1.5GiB' -> binary; plain bytes too."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GB, 500MB, 1.5GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


# -- model presets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    name: str
    model_type: str
    architecture: str
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    hybrid: bool  # linear attention with a full-attention layer every `interval`-th
    gated_q: bool  # q_proj holds query and gate rows (2·H·hd)
    qk_norm: bool
    linear_names: str = ""  # "qwen3_5" or "qwen3_next"
    interval: int = 4
    lin_k_heads: int = 16
    lin_v_heads: int = 32
    lin_k_dim: int = 128
    lin_v_dim: int = 128
    conv_kernel: int = 4
    extra: dict = field(default_factory=dict)


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "qwen3.5-4b",
            "qwen3_5_text",
            "Qwen3_5ForCausalLM",
            hidden=2560,
            intermediate=9216,
            heads=16,
            kv_heads=4,
            head_dim=256,
            vocab=248320,
            hybrid=True,
            gated_q=True,
            qk_norm=True,
            linear_names="qwen3_5",
        ),
        Preset(
            "qwen3.5-9b",
            "qwen3_5_text",
            "Qwen3_5ForCausalLM",
            hidden=4096,
            intermediate=12288,
            heads=16,
            kv_heads=4,
            head_dim=256,
            vocab=248320,
            hybrid=True,
            gated_q=True,
            qk_norm=True,
            linear_names="qwen3_5",
        ),
        Preset(
            "qwen3-next",
            "qwen3_next",
            "Qwen3NextForCausalLM",
            hidden=4096,
            intermediate=12288,
            heads=16,
            kv_heads=4,
            head_dim=256,
            vocab=248320,
            hybrid=True,
            gated_q=True,
            qk_norm=True,
            linear_names="qwen3_next",
            extra={"num_experts": 0, "decoder_sparse_step": 1, "mlp_only_layers": []},
        ),
        Preset(
            "llama-8b",
            "llama",
            "LlamaForCausalLM",
            hidden=4096,
            intermediate=14336,
            heads=32,
            kv_heads=8,
            head_dim=128,
            vocab=128256,
            hybrid=False,
            gated_q=False,
            qk_norm=False,
            extra={"rope_theta": 500000.0, "max_position_embeddings": 131072},
        ),
    )
}


def is_global(p: Preset, i: int) -> bool:
    return not p.hybrid or (i + 1) % p.interval == 0


def layer_tensors(p: Preset, i: int) -> list[tuple[str, tuple[int, ...]]]:
    """One decoder layer's tensors in module order (the order HF's sharding walks them)."""
    h, pre = p.hidden, f"model.layers.{i}."
    out: list[tuple[str, tuple[int, ...]]] = []
    if is_global(p, i):
        q_rows = (2 if p.gated_q else 1) * p.heads * p.head_dim
        a = pre + "self_attn."
        out += [
            (a + "q_proj.weight", (q_rows, h)),
            (a + "k_proj.weight", (p.kv_heads * p.head_dim, h)),
            (a + "v_proj.weight", (p.kv_heads * p.head_dim, h)),
            (a + "o_proj.weight", (h, p.heads * p.head_dim)),
        ]
        if p.qk_norm:
            out += [(a + "q_norm.weight", (p.head_dim,)), (a + "k_norm.weight", (p.head_dim,))]
    else:
        a = pre + "linear_attn."
        key_dim, value_dim = p.lin_k_heads * p.lin_k_dim, p.lin_v_heads * p.lin_v_dim
        conv_dim = 2 * key_dim + value_dim
        out += [
            (a + "conv1d.weight", (conv_dim, 1, p.conv_kernel)),
            (a + "dt_bias", (p.lin_v_heads,)),
            (a + "A_log", (p.lin_v_heads,)),
            (a + "norm.weight", (p.lin_v_dim,)),
            (a + "out_proj.weight", (h, value_dim)),
        ]
        if p.linear_names == "qwen3_next":
            out += [
                (a + "in_proj_qkvz.weight", (2 * key_dim + 2 * value_dim, h)),
                (a + "in_proj_ba.weight", (2 * p.lin_v_heads, h)),
            ]
        else:
            out += [
                (a + "in_proj_qkv.weight", (conv_dim, h)),
                (a + "in_proj_z.weight", (value_dim, h)),
                (a + "in_proj_b.weight", (p.lin_v_heads, h)),
                (a + "in_proj_a.weight", (p.lin_v_heads, h)),
            ]
    m = pre + "mlp."
    out += [
        (m + "gate_proj.weight", (p.intermediate, h)),
        (m + "up_proj.weight", (p.intermediate, h)),
        (m + "down_proj.weight", (h, p.intermediate)),
        (pre + "input_layernorm.weight", (h,)),
        (pre + "post_attention_layernorm.weight", (h,)),
    ]
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    n = BF16
    for d in shape:
        n *= d
    return n


def model_tensors(p: Preset, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    out = [("model.embed_tokens.weight", (vocab, p.hidden))]
    for i in range(layers):
        out += layer_tensors(p, i)
    out += [("model.norm.weight", (p.hidden,)), ("lm_head.weight", (vocab, p.hidden))]
    return out


def fit_size(p: Preset, size: int, min_layers: int = 4) -> tuple[int, int]:
    """(layers, vocab) whose total is about ``size`` bytes (see the module docstring)."""
    period = p.interval if p.hybrid else 1
    per_period = sum(nbytes(s) for i in range(period) for _, s in layer_tensors(p, i))
    per_layer = per_period / period
    emb_row = 2 * p.hidden * BF16  # embed_tokens + lm_head, per vocabulary entry
    vocab = p.vocab
    if vocab * emb_row > 0.4 * size:
        vocab = int(0.2 * size / emb_row)
    layers = max(min_layers, round((size - vocab * emb_row) / per_layer))
    layer_bytes = sum(nbytes(s) for i in range(layers) for _, s in layer_tensors(p, i))
    if vocab != p.vocab:  # the shrunk vocabulary takes up the slack, to a multiple of 256
        vocab = max(1024, (size - layer_bytes) // emb_row // 256 * 256)
    if layer_bytes + vocab * emb_row > 1.25 * size:
        smallest = (layer_bytes + 1024 * emb_row) / 1e9
        raise SystemExit(
            f"--size {size / 1e9:.2f} GB is too small for {min_layers} layers of {p.name} "
            f"(needs about {smallest:.2f} GB); use a larger --size or --preset qwen3.5-4b"
        )
    return layers, vocab


def config_json(p: Preset, layers: int, vocab: int) -> dict:
    cfg: dict = {
        "architectures": [p.architecture],
        "model_type": p.model_type,
        "hidden_size": p.hidden,
        "intermediate_size": p.intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": p.heads,
        "num_key_value_heads": p.kv_heads,
        "head_dim": p.head_dim,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
    }
    if p.hybrid:
        cfg.update(
            {
                "layer_types": [
                    "full_attention" if is_global(p, i) else "linear_attention"
                    for i in range(layers)
                ],
                "full_attention_interval": p.interval,
                "attn_output_gate": p.gated_q,
                "linear_conv_kernel_dim": p.conv_kernel,
                "linear_key_head_dim": p.lin_k_dim,
                "linear_value_head_dim": p.lin_v_dim,
                "linear_num_key_heads": p.lin_k_heads,
                "linear_num_value_heads": p.lin_v_heads,
                "max_position_embeddings": 262144,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000000,
                    "partial_rotary_factor": 0.25,
                },
            }
        )
    cfg.update(p.extra)
    return cfg


# -- sharding and writing -------------------------------------------------------------------------


def shard(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[str]]:
    """huggingface_hub's greedy rule: a new shard when the next tensor would overflow this one."""
    shards: list[list[str]] = []
    cur: list[str] = []
    cur_bytes = 0
    for name, shape in tensors:
        n = nbytes(shape)
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(name)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def header_bytes(names: list[str], shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A safetensors header; data in name order, as the safetensors library lays out one dtype."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name in sorted(names):
        n = nbytes(shapes[name])
        header[name] = {
            "dtype": "BF16",
            "shape": list(shapes[name]),
            "data_offsets": [off, off + n],
        }
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def random_buffers(size: int, seed: int) -> tuple[memoryview, memoryview]:
    """(PRE's, POST's) buffers of finite bf16 words; POST's differ from PRE's in the lowest bit."""
    words = np.random.default_rng(seed).integers(0, 1 << 16, size // 2, dtype=np.uint16)
    words &= 0x83FF  # keep the sign, the exponent's 3 low bits and the mantissa
    words |= 0x3C00  # exponent 0b01111xxx: 120..127, so |x| in [2^-7, 2), never inf/NaN/subnormal
    other = words ^ np.uint16(1)
    return memoryview(words.view(np.uint8)), memoryview(other.view(np.uint8))


def pieces(buf: memoryview, start: int, n: int) -> Iterator[memoryview]:
    """``n`` bytes from ``buf`` starting at ``start``, wrapping around, without copying."""
    size = len(buf)
    pos = start % size
    while n > 0:
        take = min(n, size - pos)
        yield buf[pos : pos + take]
        n -= take
        pos = 0


def write_checkpoint(
    root: str,
    buf: memoryview,
    shards: list[list[str]],
    shapes: dict[str, tuple[int, ...]],
    config: dict,
) -> None:
    os.makedirs(root)
    count = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{count:05d}.safetensors"
        with open(os.path.join(root, fname), "wb", buffering=0) as fh:
            fh.write(header_bytes(names, shapes))
            for name in sorted(names):
                n = nbytes(shapes[name])
                # Each tensor its own even offset in the buffer, so tensors differ from each other.
                start = (zlib.crc32(name.encode()) * 2) % len(buf)
                for piece in pieces(buf, start, n):
                    fh.write(piece)
                total += n
                weight_map[name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as fh:
        json.dump(index, fh, indent=2)
    with open(os.path.join(root, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    with open(os.path.join(root, "generation_config.json"), "w") as fh:
        json.dump({"do_sample": False, "transformers_version": "5.24.0"}, fh, indent=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Writes OUT/pre and OUT/post. Sizes are decimal (4GB = 4e9 bytes) unless GiB/MiB.",
    )
    ap.add_argument("out", help="folder to create; PRE and POST go in OUT/pre and OUT/post")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen3.5-4b")
    ap.add_argument("--size", type=parse_size, default=parse_size("4GB"), help="total (4GB)")
    ap.add_argument(
        "--shard-size", type=parse_size, default=parse_size("1GB"), help="max shard (1GB)"
    )
    ap.add_argument("--layers", type=int, help="number of layers (overrides the --size fit)")
    ap.add_argument("--vocab", type=int, help="vocabulary (overrides the --size fit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--buffer-mb", type=int, default=64, help="random buffer reused (64)")
    ap.add_argument("--force", action="store_true", help="replace OUT if it exists")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)

    p = PRESETS[args.preset]
    layers, vocab = fit_size(p, args.size)
    layers = args.layers or layers
    vocab = args.vocab or vocab
    tensors = model_tensors(p, layers, vocab)
    shapes = dict(tensors)
    shards = shard(tensors, args.shard_size)
    config = config_json(p, layers, vocab)

    if os.path.exists(args.out):
        if not args.force:
            print(f"{args.out}: exists (pass --force to replace it)", file=sys.stderr)
            return 2
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    t0 = time.perf_counter()
    pre_buf, post_buf = random_buffers(args.buffer_mb * 2**20, args.seed)
    for side, buf in (("pre", pre_buf), ("post", post_buf)):
        write_checkpoint(os.path.join(args.out, side), buf, shards, shapes, config)
    elapsed = time.perf_counter() - t0

    global_layers = [i for i in range(layers) if is_global(p, i)]
    routing = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|q_norm|k_norm)\.")
    routing_shards = sorted(
        {
            k
            for k, names in enumerate(shards)
            for n in names
            if (m := routing.match(n)) and int(m.group(1)) in global_layers
        }
    )
    total = sum(nbytes(s) for _, s in tensors)
    summary = {
        "out": os.path.abspath(args.out),
        "preset": p.name,
        "model_type": p.model_type,
        "layers": layers,
        "global_layers": global_layers,
        "vocab": vocab,
        "tensors": len(tensors),
        "tensor_bytes": total,
        "shards": len(shards),
        "shard_size": args.shard_size,
        "routing_shards": [k + 1 for k in routing_shards],
        "seconds": round(elapsed, 2),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{p.name}: {layers} layers (global: {global_layers}), vocab {vocab}, "
            f"{len(tensors)} tensors, {total / 1e9:.2f} GB in {len(shards)} shards; "
            f"routing tensors in shards {summary['routing_shards']}; "
            f"2 × {total / 1e9:.2f} GB written in {elapsed:.1f} s → {summary['out']}/{{pre,post}}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
