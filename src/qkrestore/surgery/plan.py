"""The restore plan: which rows of which output tensors come from PRE, checked before any write.

Planning is pure: it looks only at configs and headers. The plan is plain data that ``--dry-run``
prints, ``qkrestore.json`` records and ``verify`` replays, so what was done can always be re-checked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import OptionError, PlanError, QKRestoreError
from ..families import (
    GENERIC,
    TARGETS,
    Kind,
    LayerMap,
    RoutingTensor,
    layer_map,
    text_config,
    whole,
)
from ..families.base import merge_rows
from ..families.derived import is_derived
from ..families.shared import MLA_LATENT
from ..io.checkpoint import Checkpoint, TensorInfo
from ..io.dtypes import INTEGER_DTYPES

METHOD_RESTORE = "qk-restore"
METHOD_PRO = "qk-pro"


@dataclass(frozen=True)
class PlanOptions:
    """What to restore: the planning half of ``merge``/``pro``'s options (writing has its own).

    ``adapter_options`` are family switches named by the adapters (e.g. Kimi's
    ``{MLA_LATENT: "pre"}``); ``tensor_pattern`` names tensors by hand for unknown families.
    Each field's metadata makes it an option of the one option model (:mod:`qkrestore.options`):
    its flags and help for the CLI, its parser for API keywords and recipe values; the field's
    default is the option's default everywhere.
    """

    layers: list[int] | None = field(
        default=None,
        metadata={
            "flags": ("--layers",),
            "help": "'auto' (every global softmax-attention layer) or 0-based indices, e.g. "
            "3,7,11 or 3-7.",
            "parse": "layers",
            "show": lambda value: "auto" if value is None else ",".join(map(str, value)),
        },
    )
    include_sliding: bool = field(
        default=False,
        metadata={
            "flags": ("--include-sliding",),
            "help": "With --layers auto, also restore local (sliding) layers.",
        },
    )
    targets: tuple[str, ...] = field(
        default=("q", "k"),
        metadata={
            "flags": ("--targets",),
            "help": "Projections to restore: comma list of q,k,v,o (v/o are ablations).",
            "parse": "targets",
            "show": ",".join,
            "only": "merge",
        },
    )
    allow_arch_mismatch: bool = field(
        default=False,
        metadata={
            "flags": ("--allow-arch-mismatch",),
            "help": "Plan from POST's config even if PRE's names another family or layer map.",
        },
    )
    tensor_pattern: str | None = field(
        default=None,
        metadata={
            "flags": ("--tensor-pattern",),
            "help": "For families qkrestore does not know: a regular expression for the tensors "
            "to restore whole, with {i} standing for the layer index; needs explicit --layers.",
            "only": "merge",
        },
    )
    adapter_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={
            "key": "mla_latent",
            "flags": ("--mla-latent",),
            "help": "MLA layers (Kimi Linear): also take the latent rows of kv_a_proj_with_mqa "
            "and kv_a_layernorm, which V shares, from PRE ('pre'), or keep POST's ('post', "
            "default).",
            "choices": ("post", "pre"),
            "parse": lambda key, value: {MLA_LATENT: "pre"} if value == "pre" else {},
            "show": lambda value: str(value.get(MLA_LATENT, "post")),
            "only": "merge",
        },
    )
    carry_missing: bool = field(  # copy tensors PRE has and POST lacks (mtp.*, towers) from PRE
        default=False,
        metadata={
            "flags": ("--carry-missing",),
            "help": "Also copy, byte for byte, the tensors PRE has and POST lacks (e.g. mtp.* "
            "heads or a vision tower a trainer's save dropped) into OUT, as an extra shard in its "
            "index.",
        },
    )


@dataclass(frozen=True)
class TensorPatch:
    """One output tensor whose rows ``rows`` come from PRE (or are computed, for QK-Pro)."""

    name: str
    layer: int
    target: str
    role: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    rows: tuple[tuple[int, int], ...]
    source: str = "pre"  # "pre" | "computed"
    pre_name: str = ""
    pre_dtype: str = ""

    @property
    def cast(self) -> bool:
        return self.pre_dtype != self.dtype

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["rows"] = [list(r) for r in self.rows]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorPatch:
        return cls(
            name=d["name"],
            layer=int(d["layer"]),
            target=d["target"],
            role=d["role"],
            file=d["file"],
            dtype=d["dtype"],
            shape=tuple(d["shape"]),
            rows=tuple((int(a), int(b)) for a, b in d["rows"]),
            source=d.get("source", "pre"),
            pre_name=d.get("pre_name", d["name"]),
            pre_dtype=d.get("pre_dtype", d["dtype"]),
        )

    def row_count(self) -> int:
        return sum(b - a for a, b in self.rows)


@dataclass(frozen=True)
class CarriedTensor:
    """A tensor PRE has and POST lacks, copied whole from PRE into OUT (``--carry-missing``)."""

    name: str  # as OUT names it (POST's layer prefix)
    pre_name: str
    dtype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CarriedTensor:
        return cls(d["name"], d["pre_name"], d["dtype"], tuple(int(x) for x in d["shape"]))


@dataclass
class RestorePlan:
    """Everything the writer needs, and everything a reader of the provenance wants to know."""

    method: str
    adapter: str
    model_type: str
    num_layers: int
    layer_kinds: list[str]
    layers: list[int]
    targets: list[str]
    patches: list[TensorPatch]
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    missing_in_post: list[str] = field(default_factory=list)  # PRE has them, POST does not
    carried: list[CarriedTensor] = field(default_factory=list)  # of those, the ones OUT gets

    @property
    def touched_files(self) -> list[str]:
        return sorted({p.file for p in self.patches})

    def restored_bytes(self, post: Checkpoint) -> int:
        return sum(p.row_count() * post.tensors[p.name].row_bytes for p in self.patches)

    def by_name(self) -> dict[str, TensorPatch]:
        return {p.name: p for p in self.patches}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "adapter": self.adapter,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "layer_kinds": self.layer_kinds,
            "layers": self.layers,
            "targets": self.targets,
            "params": self.params,
            "notes": self.notes,
            "tensors": [p.to_json() for p in self.patches],
            "missing_in_post": self.missing_in_post,
            "carried": [c.to_json() for c in self.carried],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RestorePlan:
        return cls(
            method=d["method"],
            adapter=d["adapter"],
            model_type=d["model_type"],
            num_layers=int(d["num_layers"]),
            layer_kinds=list(d["layer_kinds"]),
            layers=[int(i) for i in d["layers"]],
            targets=list(d["targets"]),
            patches=[TensorPatch.from_json(t) for t in d["tensors"]],
            notes=list(d.get("notes", [])),
            params=dict(d.get("params", {})),
            missing_in_post=list(d.get("missing_in_post", [])),
            carried=[CarriedTensor.from_json(c) for c in d.get("carried", [])],
        )


# -- option parsing (pure) ------------------------------------------------------------------------


def parse_targets(text: str, option: str = "targets") -> list[str]:
    """A comma list of projections (``q,k``) → the targets in canonical order."""
    targets = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if not targets or bad:
        raise OptionError(option, f"{text!r}: use a comma list of {', '.join(TARGETS)} (e.g. q,k)")
    return sorted(set(targets), key=TARGETS.index)


def parse_layers(text: str, option: str = "layers") -> list[int] | None:
    """``auto`` → None; else a comma list of 0-based indices (ranges like ``3-7`` allowed)."""
    if text.strip().lower() == "auto":
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise OptionError(
                option, f"{text!r}: use 'auto' or 0-based indices like 3,7,11"
            ) from None
    if not out:
        raise OptionError(option, f"{text!r}: no layer given")
    return sorted(set(out))


def layers_value(option: str, value: Any) -> list[int] | None:
    """A layer selection as the API, a recipe or the CLI gives it: ``None``/``"auto"``, text
    like ``"3,7-9"``, one index, or a list of indices."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_layers(value, option)
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (list, tuple)) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value
    ):
        if not value:
            raise OptionError(option, "no layer given")
        return sorted(set(value))
    raise OptionError(option, f"{value!r}: give 'auto' or 0-based layer indices")


def targets_value(option: str, value: Any) -> tuple[str, ...]:
    """Targets as text (``"q,k"``) or a list (``["q", "k"]``)."""
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise OptionError(option, f"{value!r}: use a comma list of {', '.join(TARGETS)}")
    return tuple(parse_targets(value, option))


# -- planning -------------------------------------------------------------------------------------


def choose_layers(
    kinds: Sequence[Kind], layers: list[int] | None, include_sliding: bool
) -> list[int]:
    if layers is None:
        wanted = {Kind.GLOBAL, Kind.LOCAL} if include_sliding else {Kind.GLOBAL}
        chosen = [i for i, k in enumerate(kinds) if k in wanted]
        if not chosen:
            if Kind.LOCAL in kinds and not include_sliding:
                raise PlanError(
                    "this model has only local (sliding-window) softmax-attention layers",
                    hint="pass `include_sliding` to restore them",
                )
            raise PlanError("this model has no softmax-attention layers to restore")
        return chosen
    for i in layers:
        if not 0 <= i < len(kinds):
            raise OptionError("layers", f"layer {i} does not exist (the model has {len(kinds)})")
        if kinds[i] is Kind.OTHER:
            attn = [j for j, k in enumerate(kinds) if k is not Kind.OTHER]
            raise OptionError(
                "layers",
                f"layer {i} is not a softmax-attention layer",
                hint=f"attention layers: {','.join(map(str, attn)) or 'none'}",
            )
    return layers


def build_plan(
    pre: Checkpoint,
    post: Checkpoint,
    opts: PlanOptions | None = None,
    *,
    method: str = METHOD_RESTORE,
    source: str = "pre",
) -> RestorePlan:
    """Plan the surgery and check everything headers and configs can tell before a byte is written.

    Normally the family adapter says which layers and tensors form the routing set. With
    ``tensor_pattern`` (a regular expression with ``{i}`` standing for the layer index) the user
    names the tensors by hand, for families the tool does not know; ``layers`` must then be given.
    """
    opts = opts or PlanOptions()
    layers, include_sliding, targets = opts.layers, opts.include_sliding, opts.targets
    tensor_pattern, options = opts.tensor_pattern, opts.adapter_options
    notes: list[str] = []
    if tensor_pattern is not None:
        kinds, chosen, model_type, adapter_name = _manual_layers(post, layers)
        found = _pattern_tensors(post, tensor_pattern, chosen)
        post_prefix = pre_prefix = ""
        notes.append(f"tensors chosen by --tensor-pattern {tensor_pattern!r}")
    else:
        lmap = layer_map(post.config, post.tensors)
        kinds = list(lmap.kinds)
        model_type, adapter_name = lmap.model_type, lmap.family.name
        if not opts.allow_arch_mismatch:
            _check_same_architecture(pre, lmap)
        chosen = choose_layers(kinds, layers, include_sliding)
        post_prefix, pre_prefix = lmap.prefix, lmap.family.layer_prefix(list(pre.tensors))
        if lmap.family is GENERIC or is_derived(lmap.family):
            notes.append(lmap.reason)
        found = [rt for layer in chosen for rt in lmap.routing(layer, targets, options)]
    # A tensor shared by several layers (Zamba2's shared blocks) is planned once.
    found = merge_rows([*found, *_fp8_scales(found, post)])

    patches: list[TensorPatch] = []
    for rt in found:
        out = post.tensors[rt.name]
        pre_name = pre_prefix + rt.name[len(post_prefix) :]
        src = pre.tensors.get(pre_name)
        _check_pair(rt.name, pre_name, src, out, pre, post)
        assert src is not None
        patches.append(
            TensorPatch(
                name=rt.name,
                layer=rt.layer,
                target=rt.target,
                role=rt.role,
                file=out.file,
                dtype=out.dtype,
                shape=out.shape,
                rows=rt.rows,
                source=source,
                pre_name=pre_name,
                pre_dtype=src.dtype,
            )
        )
    casts = sorted({f"{p.pre_dtype}→{p.dtype}" for p in patches if p.cast})
    if casts and source == "pre":
        notes.append(
            f"PRE stores some restored tensors in another dtype ({', '.join(casts)}): their values "
            "are cast with torch to POST's dtype"
        )
    patches.sort(key=lambda p: (p.file, post.tensors[p.name].start))
    missing = pre_only_tensors(pre.tensors, post.tensors, pre_prefix, post_prefix)
    carried: list[CarriedTensor] = []
    if missing:
        notes.append(missing_note(list(missing), opts.carry_missing))
    if missing and opts.carry_missing:
        carried = [
            CarriedTensor(out, src, pre.tensors[src].dtype, pre.tensors[src].shape)
            for out, src in missing.items()
        ]
    return RestorePlan(
        method=method,
        adapter=adapter_name,
        model_type=model_type,
        num_layers=len(kinds),
        layer_kinds=[k.value for k in kinds],
        layers=chosen,
        targets=list(targets),
        patches=patches,
        notes=notes,
        params={"include_sliding": include_sliding, **dict(options)}
        | ({"tensor_pattern": tensor_pattern} if tensor_pattern else {}),
        missing_in_post=list(missing),
        carried=carried,
    )


def pre_only_tensors(
    pre_names: Iterable[str], post_names: Iterable[str], pre_prefix: str = "", post_prefix: str = ""
) -> dict[str, str]:
    """Tensors PRE has and POST lacks, as ``{name in OUT: name in PRE}``.

    Trainers' saves sometimes drop tensors that inference engines then miss (Qwen3-Next/Qwen3.5
    ``mtp.*``, vision towers). Names under PRE's layer prefix are compared under POST's, so a VLM
    save and a text-only save of one model line up.
    """
    post_set = set(post_names)
    out: dict[str, str] = {}
    for name in sorted(pre_names):
        mapped = post_prefix + name[len(pre_prefix) :] if name.startswith(pre_prefix) else name
        if mapped not in post_set:
            out[mapped] = name
    return out


def missing_note(names: Sequence[str], carried: bool) -> str:
    """One line for the tensors PRE has and POST lacks, grouped by their leading name part."""
    groups: dict[str, int] = {}
    for n in names:
        head = n.split(".", 1)[0] if "." in n else n
        groups[head] = groups.get(head, 0) + 1
    what = ", ".join(f"{k}.* ({v})" if v > 1 else k for k, v in sorted(groups.items()))
    if carried:
        return f"PRE has {len(names)} tensors POST lacks ({what}): copied from PRE into OUT"
    return (
        f"PRE has {len(names)} tensors POST lacks ({what}): OUT leaves them out, as POST does "
        "(--carry-missing copies them from PRE)"
    )


def pre_names_for(plan: RestorePlan, post: Checkpoint, pre_names: Iterable[str]) -> list[str]:
    """PRE's names of the plan's tensors, from PRE's index alone (before its shards are fetched)."""
    if plan.adapter == "manual":
        return [p.name for p in plan.patches]
    # A VLM save and a text-only save of one family name their layers differently.
    lmap = layer_map(post.config, post.tensors)
    post_prefix, pre_prefix = lmap.prefix, lmap.family.layer_prefix(list(pre_names))
    return [pre_prefix + p.name[len(post_prefix) :] for p in plan.patches]


def _check_same_architecture(pre: Checkpoint, post_map: LayerMap) -> None:
    pre_map = layer_map(pre.config)
    adapter, model_type, kinds = post_map.family, post_map.model_type, post_map.kinds
    pre_adapter, pre_type, pre_kinds = pre_map.family, pre_map.model_type, pre_map.kinds
    if pre_adapter.name != adapter.name or pre_type != model_type:
        raise PlanError(
            f"PRE is '{pre_type}' ({pre_adapter.name}) but POST is '{model_type}' ({adapter.name})",
            hint="pass `allow_arch_mismatch` if they really share a layout",
        )
    if pre_kinds != kinds:
        if len(pre_kinds) != len(kinds):
            where = f"{len(pre_kinds)} vs {len(kinds)} layers"
        else:
            first = next(i for i, (a, b) in enumerate(zip(pre_kinds, kinds)) if a != b)
            where = f"first at layer {first}: {pre_kinds[first].value} vs {kinds[first].value}"
        raise PlanError(
            f"PRE and POST have different layer maps ({where})",
            hint="pass `allow_arch_mismatch` to plan from POST's config anyway",
        )


def _manual_layers(
    post: Checkpoint, layers: list[int] | None
) -> tuple[list[Kind], list[int], str, str]:
    """Layer map for --tensor-pattern: the adapter's when it knows the family, else 'other'."""
    if layers is None:
        raise OptionError("tensor_pattern", "needs explicit `layers` (e.g. 3,7,11)")
    model_type = str(post.config.get("model_type", ""))
    try:
        lmap = layer_map(post.config)
        model_type, kinds = lmap.model_type, list(lmap.kinds)
    except QKRestoreError:
        n = text_config(post.config).get("num_hidden_layers")
        count = n if isinstance(n, int) and n > 0 else max(layers) + 1
        kinds = [Kind.OTHER] * count
    for i in layers:
        if not 0 <= i < len(kinds):
            raise OptionError("layers", f"layer {i} does not exist (the model has {len(kinds)})")
    return kinds, layers, model_type, "manual"


def _pattern_tensors(post: Checkpoint, pattern: str, layers: list[int]) -> list[RoutingTensor]:
    found: list[RoutingTensor] = []
    for layer in layers:
        try:
            rx = re.compile(pattern.replace("{i}", str(layer)))
        except re.error as exc:
            raise OptionError(
                "tensor_pattern", f"{pattern!r} is not a regular expression ({exc})"
            ) from None
        names = [n for n in post.tensors if rx.fullmatch(n)]
        if not names:
            raise OptionError("tensor_pattern", f"{pattern!r} matches no tensor of layer {layer}")
        for n in sorted(names):
            found.append(RoutingTensor(n, layer, "manual", "weight", whole(post.tensors[n])))
    return found


FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")


def _fp8_scales(found: Sequence[RoutingTensor], post: Checkpoint) -> list[RoutingTensor]:
    """The block scales of restored FP8 weights: a weight's bytes mean nothing without its scales.

    Block-quantised checkpoints (e.g. 128×128 blocks) store one scale per block; the restored rows
    must cover whole row-blocks so that the scale rows can be taken from PRE with them.
    """
    out: list[RoutingTensor] = []
    for rt in found:
        info = post.tensors[rt.name]
        if info.dtype not in FP8_DTYPES or not rt.name.endswith("weight"):
            continue
        for suffix in SCALE_SUFFIXES:
            scale = post.tensors.get(rt.name.removesuffix("weight") + suffix)
            if scale is None:
                continue
            if scale.rows <= 1:  # one scale for the whole tensor
                if rt.rows != whole(info):
                    raise PlanError(
                        f"'{rt.name}': only some rows are restored but '{scale.name}' is one "
                        "scale for the whole tensor"
                    )
                out.append(RoutingTensor(scale.name, rt.layer, rt.target, "scale", whole(scale)))
                break
            block = -(-info.rows // scale.rows)
            rows = []
            for r0, r1 in rt.rows:
                if r0 % block or (r1 % block and r1 != info.rows):
                    raise PlanError(
                        f"'{rt.name}': restored rows {r0}:{r1} do not cover whole {block}-row FP8 "
                        f"scale blocks of '{scale.name}'"
                    )
                rows.append((r0 // block, -(-r1 // block)))
            out.append(RoutingTensor(scale.name, rt.layer, rt.target, "scale", tuple(rows)))
            break
    return out


def _check_pair(
    name: str,
    pre_name: str,
    src: TensorInfo | None,
    out: TensorInfo,
    pre: Checkpoint,
    post: Checkpoint,
) -> None:
    if src is None:
        raise PlanError(f"{pre.root}: PRE has no tensor '{pre_name}' (POST has '{name}')")
    if src.shape != out.shape:
        raise PlanError(
            f"'{name}': shape {list(src.shape)} in PRE but {list(out.shape)} in POST "
            f"({pre.root / src.file} vs {post.root / out.file})"
        )
    if (src.dtype in FP8_DTYPES or out.dtype in FP8_DTYPES) and src.dtype != out.dtype:
        raise PlanError(
            f"'{name}': {src.dtype} in PRE but {out.dtype} in POST; PRE and POST must share the "
            "same quantisation"
        )
    if src.dtype != out.dtype and {src.dtype, out.dtype} & INTEGER_DTYPES:
        # A cast to or from an integer dtype truncates or reinterprets values: never silently.
        raise PlanError(
            f"'{name}': {src.dtype} in PRE but {out.dtype} in POST; cannot convert between "
            f"integer and other dtypes ({pre.root / src.file} vs {post.root / out.file})"
        )


def patch_ranges(
    patch: TensorPatch, pre: Checkpoint, post: Checkpoint
) -> Iterator[tuple[int, int, int, int]]:
    """(dst offset, dst length, src offset, src length) for each row range of a patch.

    Plans record rows, not bytes; byte offsets come from the headers at write and verify time.
    """
    out = post.tensors[patch.name]
    src = pre.tensors[patch.pre_name]
    for r0, r1 in patch.rows:
        dst_off, dst_len = out.byte_range(r0, r1)  # sub-byte dtypes: whole bytes or refused
        src_off, src_len = src.byte_range(r0, r1)
        yield out.start + dst_off, dst_len, src.start + src_off, src_len
