"""Layer maps derived from transformers' own modeling classes, for families without an adapter.

Mixtral, MiniMax-M2, OLMoE, GLM-4-MoE, Granite-MoE, DeepSeek-V3 and many more are known to
transformers but have no block of data here and no ``layer_types`` in their configs. For such a
``model_type`` the model is built from its config on the meta device (no weights, no memory, never
remote code), in the spirit of mergekit's auto-inference (``mergekit/architecture/auto.py`` builds the
auto class on ``torch.device("meta")`` to learn the model's structure), and read as follows:

* **Decoder layers**: the ``nn.ModuleList`` of ``num_hidden_layers`` entries nearest the root.
* **Softmax attention**: a module of a layer whose class's ``forward`` calls transformers'
  attention interface (``ALL_ATTENTION_FUNCTIONS`` or ``eager_attention_forward``): that is where the
  softmax over ``QKᵀ`` happens. Linear-attention, SSM and convolution mixers call their own kernels;
  they are recognised by this and never by projection names, which several of them share
  (``q_proj``/``k_proj`` in MiniMax's lightning layers, Kimi's KDA layers).
* **Sliding**: the module's ``is_sliding`` or ``sliding_window`` attribute, else the config's
  ``layer_types``, else a ``sliding_window`` set in the config (which such modules pass to every
  layer). The window rule (:mod:`.window`) then applies as for every family.
* **Q/K tensors**: the attention module's children. Separate ``q_proj``/``k_proj`` (with optional
  biases and ``q_norm``/``k_norm``), where ``q_proj`` has exactly ``heads × head_dim`` outputs; or
  DeepSeek-style MLA (``kv_a_proj_with_mqa``/``kv_b_proj``), mapped as Kimi Linear's MLA: K is the
  rope rows of ``kv_a_proj_with_mqa`` plus the K_nope rows of ``kv_b_proj``, and the latent shared
  with V stays POST's unless ``--mla-latent pre``.

Anything else is refused with the reason: more than one softmax module in a layer, the module at
another path in different layers, fused or gated projections (``qkv_proj``, a ``q_proj`` wider than
its heads), or parameters of unknown role (e.g. gpt-oss-style ``sinks``). Sources: transformers
5.24.0 ``modeling_mixtral.py``, ``modeling_minimax_m2.py``, ``modeling_olmoe.py``,
``modeling_deepseek_v3.py`` (``DeepseekV3Attention``: ``kv_a_proj_with_mqa`` rows are
``[kv_lora_rank | qk_rope_head_dim]``, ``kv_b_proj`` per head ``[qk_nope_head_dim | v_head_dim]``).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from ..io.runtime import quiet_transformers
from .base import GENERIC_WORDS, Config, Family, Kind, TensorSpec, check_layer_count, text_config
from .shared import kimi_tensors

ATTENTION_CALLS = ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
# Config keys that would make transformers do more than build the modules (quantised layers, remote
# code) or that only describe the saved file.
DROPPED_KEYS = ("quantization_config", "auto_map", "transformers_version", "_name_or_path")

SEPARATE_Q = ("q_proj",)
SEPARATE_K = ("k_proj",)
NORMS = {"q": ("q_norm", "q_layernorm"), "k": ("k_norm", "k_layernorm")}
OUTPUTS = ("o_proj", "out_proj", "dense")
MLA_CHILDREN = {
    "q_proj",
    "q_a_proj",
    "q_a_layernorm",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
}


class DeriveError(ConfigError):
    """The layer map could not be derived from transformers' classes; the message says why."""


@dataclass(frozen=True)
class Derived:
    """What the meta-device model says about one config."""

    family: Family
    model_type: str
    class_name: str


@functools.lru_cache(maxsize=256)
def _calls_attention_interface(cls: type) -> bool:
    """Whether ``cls.forward`` hands Q, K and V to transformers' softmax attention interface."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return any(call in source for call in ATTENTION_CALLS)


def _own_parameters(module: Any) -> list[str]:
    return [name for name, _ in module.named_parameters(recurse=False)]


def _children_with_weights(module: Any) -> dict[str, Any]:
    return {
        name: child
        for name, child in module.named_children()
        if any(True for _ in child.parameters())
    }


def _decoder_layers(model: Any, n: int) -> tuple[str, Any]:
    import torch

    found = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name
    ]
    if not found:
        raise DeriveError(
            f"config.json: the model built from it has no list of {n} decoder layers "
            "(num_hidden_layers)"
        )
    return min(found, key=lambda item: item[0].count("."))


def _softmax_module(layer: Any, index: int, path: str) -> tuple[str, Any] | None:
    hits = [
        (name, mod)
        for name, mod in layer.named_modules()
        if name and _calls_attention_interface(mod.__class__)
    ]
    # keep the outermost ones: a wrapper and the module it wraps are one attention block
    outer = [h for h in hits if not any(h[0].startswith(o[0] + ".") for o in hits if o is not h)]
    if len(outer) > 1:
        names = ", ".join(f"{path}.{index}.{name}" for name, _ in outer)
        raise DeriveError(
            f"layer {index} holds {len(outer)} softmax-attention modules ({names}); the tool "
            "cannot tell which one routes"
        )
    return outer[0] if outer else None


def _sliding(module: Any, cfg: Any, index: int) -> tuple[bool, str]:
    """Whether a softmax module is local, and which attribute or field says so."""
    attrs = vars(module)
    if isinstance(attrs.get("is_sliding"), bool):
        return attrs["is_sliding"], f"is_sliding={attrs['is_sliding']}"
    if "sliding_window" in attrs:
        window = attrs["sliding_window"]
        return window is not None, f"sliding_window={window}"
    words = getattr(cfg, "layer_types", None)
    if isinstance(words, list) and index < len(words) and words[index] in GENERIC_WORDS:
        word = words[index]
        return GENERIC_WORDS[word] is Kind.LOCAL, f"layer_types[{index}]={word!r}"
    window = getattr(cfg, "sliding_window", None)
    if window is not None:
        return True, f"config sliding_window={window} (no per-layer setting)"
    return False, "no sliding window"


def _separate_specs(module: Any, cfg: Any, where: str) -> tuple[TensorSpec, ...]:
    children = _children_with_weights(module)
    q, k = children.get("q_proj"), children.get("k_proj")
    if q is None or k is None:
        raise DeriveError(
            f"{where} ({type(module).__name__}) has no separate q_proj/k_proj "
            f"(children: {', '.join(children) or 'none'}); fused or unfamiliar projections cannot "
            "be split by derivation"
        )
    heads = getattr(cfg, "num_attention_heads", None)
    hd = getattr(module, "head_dim", None)
    if not isinstance(hd, int) and isinstance(heads, int):
        hidden = getattr(cfg, "hidden_size", None)
        hd = hidden // heads if isinstance(hidden, int) else None
    out_q = getattr(q, "out_features", None)
    if not (isinstance(heads, int) and isinstance(hd, int) and out_q == heads * hd):
        raise DeriveError(
            f"{where}.q_proj has {out_q} outputs, not num_attention_heads × head_dim "
            f"({heads} × {hd}); a gated or fused query cannot be split by derivation"
        )
    specs = [
        TensorSpec("q_proj.weight", "q", "weight", required=True),
        TensorSpec("q_proj.bias", "q", "bias"),
        TensorSpec("k_proj.weight", "k", "weight", required=True),
        TensorSpec("k_proj.bias", "k", "bias"),
    ]
    known = {"q_proj", "k_proj"}
    for target, names in NORMS.items():
        for name in names:
            if name in children:
                specs.append(TensorSpec(f"{name}.weight", target, "norm", required=True))
                known.add(name)
    if "v_proj" in children:
        specs += [
            TensorSpec("v_proj.weight", "v", "weight", required=True),
            TensorSpec("v_proj.bias", "v", "bias"),
        ]
        known.add("v_proj")
    for name in OUTPUTS:
        if name in children:
            specs += [
                TensorSpec(f"{name}.weight", "o", "weight", required=True),
                TensorSpec(f"{name}.bias", "o", "bias"),
            ]
            known.add(name)
            break
    unknown = sorted(set(children) - known) + _own_parameters(module)
    if unknown:
        raise DeriveError(
            f"{where} ({type(module).__name__}) also holds {', '.join(unknown)}, whose part in "
            "routing the tool cannot tell"
        )
    return tuple(specs)


def _check_mla(module: Any, cfg: Any, where: str) -> None:
    children = _children_with_weights(module)
    unknown = sorted(set(children) - MLA_CHILDREN) + _own_parameters(module)
    if unknown:
        raise DeriveError(
            f"{where} ({type(module).__name__}) is MLA but also holds {', '.join(unknown)}, whose "
            "part in routing the tool cannot tell"
        )
    for key in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank"):
        if not isinstance(getattr(cfg, key, None), int):
            raise DeriveError(f"config.json: MLA attention in {where} needs '{key}'")


def _clean(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in DROPPED_KEYS}


# Expert counts only decide how many MLP modules a layer builds; the attention modules do not depend
# on them. Building 128-expert layers module by module costs seconds even on the meta device, so the
# count is first lowered to what routing needs (top-k, expert groups); if the config class or model
# rejects that, the config is built as it is.
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
EXPERT_NEEDS = ("num_experts_per_tok", "experts_per_token", "num_experts_per_token", "n_group")


def _fewer_experts(cfg: dict[str, Any]) -> dict[str, Any] | None:
    needs = [v for k in EXPERT_NEEDS if isinstance(v := cfg.get(k), int) and v > 0]
    floor = max([2, *needs])
    shrunk = {
        k: floor
        for k in EXPERT_COUNTS
        if isinstance(cfg.get(k), int) and not isinstance(cfg.get(k), bool) and cfg[k] > floor
    }
    return cfg | shrunk if shrunk else None


def _build(model_type: str, cfg_dict: dict[str, Any]) -> Any:
    """The model, on the meta device, from transformers' own class for ``model_type``."""
    try:
        import torch
        import transformers
        from transformers import CONFIG_MAPPING, AutoModel, AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_MAPPING_NAMES,
        )
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise DeriveError(f"transformers is needed to derive a layer map ({exc})") from None
    if model_type not in CONFIG_MAPPING:
        raise DeriveError(
            f"config.json: transformers {transformers.__version__} does not know model_type "
            f"'{model_type}' either"
        )
    quiet_transformers()
    try:
        cfg = CONFIG_MAPPING[model_type].from_dict(cfg_dict)
        cfg._attn_implementation = "eager"
    except Exception as exc:  # any config error is the user's file
        raise DeriveError(
            f"config.json: transformers' {CONFIG_MAPPING[model_type].__name__} rejects it: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    # Pick the auto class by its name table: asking AutoModelForCausalLM for a type it lacks makes
    # transformers import every model module to word its error (seconds).
    auto: type[AutoModel] | type[AutoModelForCausalLM]
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = AutoModelForCausalLM
    elif model_type in MODEL_MAPPING_NAMES:
        auto = AutoModel
    else:
        raise DeriveError(f"config.json: transformers has no model class for '{model_type}'")
    try:
        with torch.device("meta"):
            return cfg, auto.from_config(cfg)
    except Exception as exc:  # report it, do not crash
        raise DeriveError(
            f"config.json: transformers could not build '{model_type}' on the meta device: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


@functools.lru_cache(maxsize=32)
def _derive_cached(key: str) -> Derived:
    config = json.loads(key)
    inner = text_config(config)
    model_type = str(inner.get("model_type") or config.get("model_type") or "")
    if not model_type:
        raise DeriveError("config.json: no 'model_type' to look up in transformers")
    cleaned = _clean(inner)
    for key in ("num_hidden_layers", "num_layers", "n_layer", "n_layers"):
        value = cleaned.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            check_layer_count(value, key)  # before transformers builds that many layers
    fewer = _fewer_experts(cleaned)
    try:
        cfg, model = _build(model_type, fewer if fewer is not None else cleaned)
    except DeriveError:
        if fewer is None:
            raise
        cfg, model = _build(model_type, cleaned)
    n = getattr(cfg, "num_hidden_layers", None)  # through the config class's attribute_map
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise DeriveError("config.json: 'num_hidden_layers' is missing or not a positive integer")
    class_name = type(model).__name__
    path, layers = _decoder_layers(model, n)

    kinds: list[Kind] = []
    why: list[str] = []
    modules: dict[int, tuple[str, Any]] = {}
    for i, layer in enumerate(layers):
        found = _softmax_module(layer, i, path)
        if found is None:
            kinds.append(Kind.OTHER)
            why.append(f"{type(layer).__name__}: no module calls the softmax attention interface")
            continue
        name, mod = found
        modules[i] = (name, mod)
        local, said = _sliding(mod, cfg, i)
        kinds.append(Kind.LOCAL if local else Kind.GLOBAL)
        why.append(f"{name} ({type(mod).__name__}) is softmax attention, {said}")
    if not modules:
        raise DeriveError(
            f"config.json: transformers' {class_name} has no module that calls the softmax "
            "attention interface"
        )
    rel = {name for name, _ in modules.values()}
    if len(rel) > 1:
        raise DeriveError(
            f"config.json: softmax attention sits at different paths in different layers "
            f"({', '.join(sorted(rel))}); one path per family is needed"
        )
    module_path = rel.pop()
    first, (_, sample) = next(iter(modules.items()))
    where = f"{path}.{first}.{module_path}"
    children = _children_with_weights(sample)
    description = f"derived from transformers' {class_name} on the meta device"
    if "kv_a_proj_with_mqa" in children and "kv_b_proj" in children:
        _check_mla(sample, cfg, where)
        tensors: tuple[TensorSpec, ...] = ()
        resolver = kimi_tensors
        no_head_pairs = "MLA layers"
        description += (
            "; MLA: K = rope rows of kv_a_proj_with_mqa + K_nope rows of kv_b_proj, the latent "
            "shared with V stays POST's unless mla_latent=pre"
        )
    else:
        tensors = _separate_specs(sample, cfg, where)
        resolver = None
        no_head_pairs = ""
    frozen_kinds, frozen_why = tuple(kinds), tuple(why)
    family = Family(
        name=f"derived:{model_type}",
        model_types=(),
        kinds=lambda _cfg, _n: list(frozen_kinds),
        explain=lambda _cfg, _n: list(frozen_why),
        tensors=tensors,
        container=path.rsplit(".", 1)[-1],
        module=module_path,
        resolve=resolver,
        description=description,
        notes=(f"no qkrestore adapter for '{model_type}': the layer map was {description}",),
        no_head_pairs=no_head_pairs,
    )
    return Derived(family, model_type, class_name)


def derive(config: Config) -> Derived:
    """The derived adapter for ``config``, or :class:`DeriveError` saying why there is none."""
    try:
        key = json.dumps(config, sort_keys=True, default=str)
    except (TypeError, ValueError):
        raise DeriveError("config.json: cannot be read as plain JSON") from None
    return _derive_cached(key)


def is_derived(family: Family) -> bool:
    return family.name.startswith("derived:")
