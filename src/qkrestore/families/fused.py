"""Families whose Q, K and V projections share one fused tensor: Phi-3, GPT-NeoX, Falcon, InternLM2.

Only the rows of the fused tensor that feed the attention logits are restored: the Q rows for target
``q`` and the K rows for target ``k``; the V rows stay POST's unless ``v`` is asked for. Each layout
is written as the sequence of row blocks that the model's own split reads, in order, so a picker is
just "the blocks of one target", with adjacent blocks joined. Sources (transformers 5.24.0):

* Phi-3: ``modeling_phi3.py::Phi3Attention.forward`` (``qkv[..., :query_pos]`` …);
* GPT-NeoX: ``modeling_gpt_neox.py::GPTNeoXAttention.forward`` (``view(..., -1, 3 * head_size)``
  then ``chunk(3)``);
* Falcon: ``modeling_falcon.py::FalconAttention.__init__`` (``qkv_out_dim``, ``num_kv_heads``) and
  ``FalconAttention._split_heads``;
* InternLM2 (remote code): ``modeling_internlm2.py::InternLM2Attention.forward``
  (``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + num_key_value_groups)``).

See ``docs/families-fused.md`` for the diagrams.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import ConfigError, PlanError
from ..io.checkpoint import TensorInfo
from .base import Config, Family, Kind, RowRanges, TensorSpec, head_dim, int_field
from .common import all_global_kinds, mistral_kinds

Blocks = list[tuple[str, int]]  # (target, number of rows), in row order
Layout = Callable[[Config], tuple[str, Blocks]]  # (a short description, the blocks)

# -- layouts --------------------------------------------------------------------------------------


def _optional_int(cfg: Config, key: str, default: int) -> int:
    """A positive integer field that the config may leave out or set to null (then ``default``)."""
    return default if cfg.get(key) is None else int_field(cfg, key)


def _split_head_dim(cfg: Config, hidden_key: str = "hidden_size") -> tuple[int, int]:
    """``hidden_size // num_attention_heads``, checked: these models have no ``head_dim`` field."""
    hidden, heads = int_field(cfg, hidden_key), int_field(cfg, "num_attention_heads")
    if hidden % heads:
        raise ConfigError(
            f"config.json: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )
    return heads, hidden // heads


def _grouped(heads: int, kv: int, hd: int) -> Blocks:
    """Per KV group: its ``heads // kv`` query heads, then one key head, then one value head."""
    if heads % kv:
        raise ConfigError(
            f"config.json: {heads} attention heads cannot be split into {kv} key/value groups"
        )
    return [("q", heads // kv * hd), ("k", hd), ("v", hd)] * kv


def phi3_layout(cfg: Config) -> tuple[str, Blocks]:
    """``[Q: H·hd | K: KV·hd | V: KV·hd]``; ``num_key_value_heads`` defaults to the head count."""
    heads, hd = int_field(cfg, "num_attention_heads"), head_dim(cfg)
    kv = _optional_int(cfg, "num_key_value_heads", heads)
    return (
        f"Phi-3 [Q|K|V] with {heads} query and {kv} key/value heads of {hd}",
        [("q", heads * hd), ("k", kv * hd), ("v", kv * hd)],
    )


def gpt_neox_layout(cfg: Config) -> tuple[str, Blocks]:
    """Per head ``[q | k | v]`` of ``head_size = hidden_size // num_attention_heads`` rows each."""
    heads, hd = _split_head_dim(cfg)
    return (
        f"GPT-NeoX per-head [q|k|v] with {heads} heads of {hd}",
        [("q", hd), ("k", hd), ("v", hd)] * heads,
    )


# The remote-code spelling Falcon was first published in (tiiuae/falcon-40b and falcon-7b before
# their move to ``falcon``): ``RefinedWeb`` is the grouped new decoder architecture with
# ``n_head_kv`` groups, ``RefinedWebModel`` the multi-query one; ``n_head``/``n_layer`` are the old
# names of ``num_attention_heads``/``num_hidden_layers``. Source: falcon-40b's ``modelling_RW.py``
# and transformers' conversion of these configs into ``FalconConfig``.
LEGACY_FALCON = ("RefinedWeb", "RefinedWebModel")


def _modern_falcon(cfg: Config) -> Config:
    """``cfg`` with the legacy RefinedWeb keys given their ``FalconConfig`` names."""
    if cfg.get("model_type") not in LEGACY_FALCON:
        return cfg
    out = dict(cfg)
    for old, new in (("n_head", "num_attention_heads"), ("n_layer", "num_hidden_layers")):
        if out.get(new) is None and out.get(old) is not None:
            out[new] = out[old]
    if cfg.get("model_type") == "RefinedWeb":
        out.setdefault("new_decoder_architecture", True)
        if out.get("num_kv_heads") is None and out.get("n_head_kv") is not None:
            out["num_kv_heads"] = out["n_head_kv"]
    return out


def falcon_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """Every layer global; the legacy spelling counts its layers in ``n_layer``."""
    legacy = _modern_falcon(cfg)
    return all_global_kinds(legacy, n if n is not None else legacy.get("num_hidden_layers"))


def falcon_layout(cfg: Config) -> tuple[str, Blocks]:
    """The three Falcon layouts, chosen like ``FalconAttention`` does (defaults as ``FalconConfig``).

    ``new_decoder_architecture`` wins over ``multi_query`` (default True); ``num_kv_heads`` defaults
    to the head count and only matters for the new decoder architecture; ``n_embed`` is the old name
    of ``hidden_size``.
    """
    cfg = _modern_falcon(cfg)
    hidden_key = "n_embed" if cfg.get("n_embed") is not None else "hidden_size"
    heads, hd = _split_head_dim(cfg, hidden_key)
    if cfg.get("new_decoder_architecture", False):
        kv = _optional_int(cfg, "num_kv_heads", heads)
        return (
            f"Falcon new_decoder_architecture, {kv} groups of [{heads // kv}×q|k|v], head_dim {hd}",
            _grouped(heads, kv, hd),
        )
    if cfg.get("multi_query", True):
        return (
            f"Falcon multi_query [Q|k|v] with {heads} query heads of {hd}",
            [("q", heads * hd), ("k", hd), ("v", hd)],
        )
    return (
        f"Falcon per-head [q|k|v] with {heads} heads of {hd}",
        [("q", hd), ("k", hd), ("v", hd)] * heads,
    )


def internlm2_layout(cfg: Config) -> tuple[str, Blocks]:
    """Per KV group ``[q×g | k | v]`` with ``g = H / KV`` and ``hd = hidden_size // H``."""
    heads, hd = _split_head_dim(cfg)
    kv = _optional_int(cfg, "num_key_value_heads", heads)
    return (
        f"InternLM2 {kv} groups of [{heads // kv}×q|k|v], head_dim {hd}",
        _grouped(heads, kv, hd),
    )


def target_rows(blocks: Sequence[tuple[str, int]], target: str) -> RowRanges:
    """The row ranges of ``target``'s blocks, with touching ranges joined."""
    out: list[tuple[int, int]] = []
    start = 0
    for who, n in blocks:
        if who == target:
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], start + n)
            else:
                out.append((start, start + n))
        start += n
    return tuple(out)


def fused_rows(layout: Layout, target: str) -> Callable[[Config, TensorInfo], RowRanges]:
    """A row picker for ``target`` in a fused tensor (weight or bias) of the given layout."""

    def pick(cfg: Config, info: TensorInfo) -> RowRanges:
        what, blocks = layout(cfg)
        total = sum(n for _, n in blocks)
        if info.rows != total:
            raise PlanError(
                f"'{info.name}' has {info.rows} rows but the config describes {what}, "
                f"which needs {total}"
            )
        return target_rows(blocks, target)

    pick.__name__ = f"{layout.__name__.removesuffix('_layout')}_{target}_rows"
    return pick


def fused_projections(layout: Layout, qkv: str, o: str) -> tuple[TensorSpec, ...]:
    """One fused QKV Linear (weight, optional bias) split by ``layout``, and the output Linear."""
    specs: list[TensorSpec] = []
    for target in ("q", "k", "v"):
        rows = fused_rows(layout, target)
        specs.append(TensorSpec(f"{qkv}.weight", target, "weight", rows=rows, required=True))
        specs.append(TensorSpec(f"{qkv}.bias", target, "bias", rows=rows))
    specs.append(TensorSpec(f"{o}.weight", "o", "weight", required=True))
    specs.append(TensorSpec(f"{o}.bias", "o", "bias"))
    return tuple(specs)


# -- the families ---------------------------------------------------------------------------------

FAMILIES: tuple[Family, ...] = (
    Family(
        name="phi3",
        model_types=("phi3",),
        architectures=("Phi3ForCausalLM",),
        # transformers 5.24 gives every layer the sliding-window mask when sliding_window is set
        # (Phi3Model.forward picks create_sliding_window_causal_mask), exactly like Mistral.
        kinds=mistral_kinds,
        tensors=fused_projections(phi3_layout, "qkv_proj", "o_proj"),
        description="Phi-3: fused qkv_proj [Q|K|V]; every layer local when sliding_window is set "
        "and shorter than the context",
        notes=(
            "with sliding_window set, transformers 5.24 masks every layer with it; a window at least "
            "as long as max_position_embeddings (Phi-3-mini-128k, Phi-3.5-mini: 262144 over 131072) "
            "never slides, so those layers count as global",
        ),
    ),
    Family(
        name="gpt_neox",
        model_types=("gpt_neox",),
        architectures=("GPTNeoXForCausalLM",),
        kinds=all_global_kinds,
        tensors=fused_projections(gpt_neox_layout, "query_key_value", "dense"),
        module="attention",
        description="GPT-NeoX: fused query_key_value, per-head [q|k|v]; every layer global",
    ),
    Family(
        name="falcon",
        model_types=("falcon", *LEGACY_FALCON),
        architectures=("FalconForCausalLM", "RWForCausalLM"),
        kinds=falcon_kinds,
        tensors=fused_projections(falcon_layout, "query_key_value", "dense"),
        container="h",
        module="self_attention",
        description="Falcon: fused query_key_value in one of three layouts; every layer global",
    ),
    Family(
        name="internlm2",
        model_types=("internlm2",),
        architectures=("InternLM2ForCausalLM",),
        kinds=all_global_kinds,
        tensors=fused_projections(internlm2_layout, "wqkv", "wo"),
        module="attention",
        description="InternLM2 (remote code): fused wqkv, per KV group [q×g|k|v]; all global",
    ),
)
