"""Families whose routing lives in shared tensors: Kimi Linear (MLA) and Zamba2 (tied blocks).

* **Kimi Linear** MLA layers compute the keys from a low-rank latent that the values share. The key
  routing is the rope-key rows of ``kv_a_proj_with_mqa`` plus, per head, the K_nope rows of
  ``kv_b_proj``; the latent rows of ``kv_a_proj_with_mqa`` and ``kv_a_layernorm`` feed K *and* V and
  stay POST's unless the planning option ``mla_latent="pre"`` (CLI ``--mla-latent pre``) is given.
* **Zamba2** hybrid layers run one of ``num_mem_blocks`` shared transformer blocks plus a per-layer
  LoRA adapter on the block's q/k/v projections. In a tied save the block is stored under its
  first user only; one tensor may therefore route several layers.

Sources (transformers 5.24.0):

* ``configuration_kimi_linear.py::KimiLinearConfig.__post_init__`` (layer map, 1-based
  ``linear_attn_config`` lists, the ``i % 4`` fallback);
* ``modeling_kimi_linear.py::KimiLinearAttention.__init__``/``forward``/``expand_kv`` (rows);
* ``configuration_zamba2.py::Zamba2Config.__post_init__`` (``layers_block_type`` and its default);
* ``modeling_zamba2.py::Zamba2Model.get_layers`` (which block each hybrid layer uses, and the ties),
  ``Zamba2Attention.__init__``/``forward`` (adapter ``n`` of hybrid ordinal ``n``);
* ``modeling_utils.py::PreTrainedModel.get_expanded_tied_weights_keys`` (no ties at all when
  ``tie_word_embeddings`` is false) and ``tie_weights`` (copies that differ are *not* tied).

See ``docs/families-mla-shared.md`` for the row diagrams.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError, PlanError
from ..io.checkpoint import TensorInfo
from .base import (
    Config,
    Family,
    Kind,
    LayerContext,
    RoutingTensor,
    RowRanges,
    int_field,
    kinds_from_words,
    whole,
)

MLA_LATENT = "mla_latent"  # planning option: "pre" takes the shared MLA latent from PRE too


def _need(n: int | None) -> int:
    if n is None:
        raise ConfigError("config.json: 'num_hidden_layers' is missing")
    return n


class _Collector:
    """Looks tensors up for one layer and records the rows each target owns."""

    def __init__(self, family: Family, ctx: LayerContext) -> None:
        self.family, self.ctx = family, ctx
        self.found: list[RoutingTensor] = []

    def add(
        self,
        suffix: str,
        target: str,
        role: str,
        rows: Callable[[TensorInfo], RowRanges] | None = None,
        *,
        required: bool = False,
        layer: int | None = None,
    ) -> bool:
        ctx = self.ctx
        name = ctx.name(self.family.module, suffix, layer)
        info = ctx.tensors.get(name)
        if info is None:
            if required:
                raise PlanError(
                    f"layer {ctx.layer} should hold '{name}' ({self.family.name} layout) but it "
                    "is missing"
                )
            return False
        picked = rows(info) if rows else whole(info)
        self.found.append(RoutingTensor(name, ctx.layer, target, role, picked))
        return True


# == Kimi Linear ==================================================================================


def kimi_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """MLA (softmax) layers of Kimi Linear, exactly as ``KimiLinearConfig`` reads them.

    ``layer_types`` first (``full_attention`` is MLA, ``linear_attention`` is KDA); else the 1-based
    ``linear_attn_config.full_attn_layers``/``kda_layers`` (transformers uses them only when both are
    there; Moonshot's remote code reads ``kda_layers`` alone, so a config with one list, a layer in
    both or in neither is refused rather than guessed); else transformers' default: layer ``i`` is
    MLA iff ``i > 0 and i % 4 == 0``.
    """
    if cfg.get("layer_types") is not None:
        return kinds_from_words(cfg.get("layer_types"), {"full_attention": Kind.GLOBAL})
    n = _need(n)
    lac = cfg.get("linear_attn_config")
    if isinstance(lac, Mapping) and ("full_attn_layers" in lac or "kda_layers" in lac):
        full, kda = lac.get("full_attn_layers"), lac.get("kda_layers")
        if full is None or kda is None:
            raise ConfigError(
                "config.json: linear_attn_config has only one of 'full_attn_layers' and "
                "'kda_layers'; transformers then ignores it and remote code does not, so the "
                "layer map is ambiguous",
                hint="add the other list, or a 'layer_types' list",
            )
        lists = {"full_attn_layers": full, "kda_layers": kda}
        for key, value in lists.items():
            if not isinstance(value, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= n for x in value
            ):
                raise ConfigError(
                    f"config.json: linear_attn_config.{key} must list 1-based layer numbers 1..{n}"
                )
        both = sorted(set(full) & set(kda))
        neither = sorted(set(range(1, n + 1)) - set(full) - set(kda))
        if both or neither:
            what = f"in both lists: {both}" if both else f"in neither list: {neither}"
            raise ConfigError(
                f"config.json: linear_attn_config: layers (1-based) {what}",
                hint="each layer must be in exactly one of full_attn_layers and kda_layers",
            )
        return [Kind.GLOBAL if i + 1 in full else Kind.OTHER for i in range(n)]
    return [Kind.GLOBAL if i and i % 4 == 0 else Kind.OTHER for i in range(n)]


def _latent_from_pre(options: Mapping[str, Any]) -> bool:
    value = options.get(MLA_LATENT)
    if value in (None, False, "post"):
        return False
    if value in (True, "pre"):
        return True
    raise PlanError(f"option {MLA_LATENT}={value!r}: use 'pre' or 'post'")


def _check_rows(info: TensorInfo, want: int, what: str) -> None:
    if info.rows != want:
        raise PlanError(f"'{info.name}' has {info.rows} rows; {what} needs {want}")


def kimi_tensors(family: Family, ctx: LayerContext) -> list[RoutingTensor]:
    """The MLA routing of one Kimi Linear layer.

    ``kv_a_proj_with_mqa`` (weight ``[r + rope, hidden]``, bias when ``attention_bias``)::

        rows [0, r)          latent → kv_a_layernorm → kv_b_proj   (K_nope and V: option only)
        rows [r, r + rope)   k_rot, one key part shared by all heads (target k)

    ``kv_b_proj`` (weight ``[H·(nope + v), r]``), per head ``h``::

        rows [h·(nope+v), h·(nope+v) + nope)          K_nope of head h   (target k)
        rows [h·(nope+v) + nope, (h+1)·(nope+v))      V of head h        (target v)

    Target q is ``q_proj`` whole, or ``q_a_proj`` (+ bias), ``q_a_layernorm`` and ``q_b_proj`` when
    ``q_lora_rank`` is set. With ``mla_latent="pre"`` the latent rows ``[0, r)`` (and bias rows) and
    ``kv_a_layernorm`` are restored too, whenever k or v is a target. ``head_dim`` in Kimi's config
    equals ``qk_rope_head_dim`` and is not used.
    """
    cfg = ctx.config
    heads = int_field(cfg, "num_attention_heads")
    nope = int_field(cfg, "qk_nope_head_dim")
    rope = int_field(cfg, "qk_rope_head_dim")
    v_dim = int_field(cfg, "v_head_dim")
    rank = int_field(cfg, "kv_lora_rank")
    latent = _latent_from_pre(ctx.options)
    per_head = nope + v_dim
    col = _Collector(family, ctx)

    def kv_a_rope(info: TensorInfo) -> RowRanges:
        _check_rows(info, rank + rope, f"kv_a_proj_with_mqa with kv_lora_rank {rank} + rope {rope}")
        return ((rank, rank + rope),)

    def kv_a_latent(info: TensorInfo) -> RowRanges:
        _check_rows(info, rank + rope, f"kv_a_proj_with_mqa with kv_lora_rank {rank} + rope {rope}")
        return ((0, rank),)

    def kv_b_rows(offset: int, size: int) -> Callable[[TensorInfo], RowRanges]:
        def pick(info: TensorInfo) -> RowRanges:
            _check_rows(info, heads * per_head, f"kv_b_proj with {heads} heads of {nope}+{v_dim}")
            return tuple(
                (h * per_head + offset, h * per_head + offset + size) for h in range(heads)
            )

        return pick

    targets = ctx.targets
    if "q" in targets:
        if cfg.get("q_lora_rank") is None:
            col.add("q_proj.weight", "q", "weight", required=True)
        else:
            col.add("q_a_proj.weight", "q", "weight", required=True)
            col.add("q_a_proj.bias", "q", "bias")
            col.add("q_a_layernorm.weight", "q", "norm")
            col.add("q_b_proj.weight", "q", "weight", required=True)
    if "k" in targets:
        col.add("kv_a_proj_with_mqa.weight", "k", "weight", kv_a_rope, required=True)
        col.add("kv_a_proj_with_mqa.bias", "k", "bias", kv_a_rope)
    if latent and ("k" in targets or "v" in targets):
        target = "k" if "k" in targets else "v"
        col.add("kv_a_proj_with_mqa.weight", target, "weight", kv_a_latent, required=True)
        col.add("kv_a_proj_with_mqa.bias", target, "bias", kv_a_latent)
        col.add("kv_a_layernorm.weight", target, "norm", required=True)
    # kv_b_proj last, so that a per-target summary that keeps the last weight shows K_nope's drift
    if "k" in targets:
        col.add("kv_b_proj.weight", "k", "weight", kv_b_rows(0, nope), required=True)
    if "v" in targets:
        col.add("kv_b_proj.weight", "v", "weight", kv_b_rows(nope, v_dim), required=True)
    if "o" in targets:
        col.add("o_proj.weight", "o", "weight", required=True)
        col.add("o_proj.bias", "o", "bias")
    return col.found


# == Zamba2 =======================================================================================

# ``Zamba2Config.__post_init__``'s default layer list (Zamba2-2.7B, 54 layers).
ZAMBA2_DEFAULT_BLOCKS = (
    ["linear_attention"]
    + (["linear_attention"] * 5 + ["hybrid"]) * 7
    + ["linear_attention"] * 4
    + ["hybrid"]
    + ["linear_attention"] * 3
    + ["hybrid"]
    + ["linear_attention"] * 2
)
ZAMBA2_ATTN = "shared_transformer.self_attn"
_PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_ADAPTER = {
    "q": "linear_q_adapter_list",
    "k": "linear_k_adapter_list",
    "v": "linear_v_adapter_list",
}


def zamba2_block_types(cfg: Config) -> list[str]:
    """``layers_block_type`` (``layer_types`` is its alias), else transformers' default list."""
    words = cfg.get("layers_block_type")
    if words is None:
        words = cfg.get("layer_types")
    if words is None:
        return list(ZAMBA2_DEFAULT_BLOCKS)
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise ConfigError("config.json: 'layers_block_type' must be a list of strings")
    return words


def zamba2_kinds(cfg: Config, n: int | None) -> list[Kind]:
    """A ``hybrid`` layer runs a shared (global, causal) attention block; ``mamba`` ones do not."""
    return [Kind.GLOBAL if w == "hybrid" else Kind.OTHER for w in zamba2_block_types(cfg)]


def zamba2_tensors(family: Family, ctx: LayerContext) -> list[RoutingTensor]:
    """The routing tensors that hybrid layer ``L`` (hybrid ordinal ``n``) is responsible for.

    Hybrid ordinal ``n`` runs shared block ``b = n % num_mem_blocks`` and LoRA adapter ``n``
    (``linear_{q,k,v}_adapter_list.{n}.{0,1}.weight``, stored inside the block) on top of the block's
    projections; the *owner* of block ``b`` is the ``b``-th hybrid layer, its first user.

    Tied saves (``tie_word_embeddings`` true, transformers' default): every tensor is planned once,
    for the layer it belongs to:

    * the owner restores the block's ``q_proj``/``k_proj`` (every stored copy: v5 saves keep the
      block under the owner only, other tools store a copy under every hybrid layer; copies that
      differ would no longer be tied on load). This changes the block for **every** hybrid layer
      that uses it (ordinals ``b, b + M, b + 2M, …``);
    * each hybrid layer restores its own adapter ``n`` (in the owner's block, and in every copy).

    So ``--layers auto`` restores everything once, and a ``--layers`` subset restores the adapters
    of the listed layers plus the shared projections of the blocks whose owners are listed: listing
    a non-owner alone leaves the shared projections POST's; listing an owner changes them for all
    the block's users.

    Untied saves (``tie_word_embeddings`` false): each hybrid layer has its own block, of which it
    uses the projections and adapter ``n`` only (its other adapter slots are never run and stay
    POST's). Targets v and o work the same way (``v_proj`` + v adapter, ``o_proj``).
    """
    cfg = ctx.config
    types = zamba2_block_types(cfg)
    hybrid = [i for i, w in enumerate(types) if w == "hybrid"]
    if ctx.layer not in hybrid:
        raise PlanError(f"layer {ctx.layer} is not a Zamba2 hybrid layer")
    n = hybrid.index(ctx.layer)
    blocks = int_field(cfg, "num_mem_blocks", 1)
    adapters = bool(cfg.get("use_shared_attention_adapter", False))
    tied = bool(cfg.get("tie_word_embeddings", True))
    col = _Collector(family, ctx)

    if tied:
        b = n % blocks
        owner = hybrid[b]
        holders = hybrid[b::blocks]  # the owner first, then the layers that may hold a copy
        for t in ctx.targets:
            if n == b:
                for x in holders:
                    col.add(f"{_PROJ[t]}.weight", t, "weight", required=x == owner, layer=x)
            if adapters and t in _ADAPTER:
                for x in holders:
                    for part in (0, 1):
                        suffix = f"{_ADAPTER[t]}.{n}.{part}.weight"
                        col.add(suffix, t, "adapter", required=x == owner, layer=x)
    else:
        for t in ctx.targets:
            col.add(f"{_PROJ[t]}.weight", t, "weight", required=True)
            if adapters and t in _ADAPTER:
                for part in (0, 1):
                    col.add(f"{_ADAPTER[t]}.{n}.{part}.weight", t, "adapter", required=True)
    return col.found


# == registry =====================================================================================

FAMILIES: tuple[Family, ...] = (
    Family(
        name="kimi_linear",
        model_types=("kimi_linear",),
        architectures=("KimiLinearForCausalLM",),
        kinds=kimi_kinds,
        tensors=(),
        resolve=kimi_tensors,
        description="Kimi Linear: MLA layers; K = rope rows of kv_a_proj_with_mqa + K_nope rows of "
        "kv_b_proj; latent shared with V stays POST's unless mla_latent=pre",
        notes=(
            "KDA layers also have q_proj/k_proj; only layers the config marks full_attention are "
            "touched",
        ),
        no_head_pairs="MLA layers",
    ),
    Family(
        name="zamba2",
        model_types=("zamba2",),
        architectures=("Zamba2ForCausalLM",),
        kinds=zamba2_kinds,
        tensors=(),
        module=ZAMBA2_ATTN,
        resolve=zamba2_tensors,
        description="Zamba2: hybrid layers; shared block q/k_proj (restored by the block's owner, "
        "for all its users) + per-layer LoRA adapters",
        notes=("restoring a shared block's projections changes every hybrid layer that uses it",),
        no_head_pairs="shared blocks with LoRA adapters",
    ),
)
