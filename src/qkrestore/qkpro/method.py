"""The ``pro`` job: QK-Pro on top of the restore plan.

The plan is the same as ``merge``'s (same layers, same routing tensors, same row ranges); the only
difference is that the weight rows of the *free* side (W_Q with ``--fix key``, W_K with
``--fix query``) are marked ``computed`` and solved in closed form by :mod:`qkrestore.qkpro.closed_form`.
The fixed side, and every bias and q/k norm of the routing set, still come from PRE byte for byte.

Solved rows are cast to POST's dtype and spilled to a temporary file next to OUT, so memory holds
one batch of layers at a time rather than every solved tensor of the model.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import OutputError, PlanError
from ..families import layer_map, text_config
from ..io.checkpoint import Checkpoint
from ..io.dtypes import FLOAT_DTYPES, to_bytes
from ..io.runtime import resolve_device
from ..io.tensors import nonfinite, read_rows
from ..surgery.plan import METHOD_PRO, PlanOptions, RestorePlan, TensorPatch, build_plan
from .closed_form import solve as solve_heads
from .closed_form import solve_cross_gram_batched

if TYPE_CHECKING:
    import torch

BATCH_BYTES = 1 << 30
FORMS = ("ridge", "cross-gram")  # pro --form: docs/qk-pro.md derives both


@dataclass(frozen=True)
class QKPro:
    """QK-Pro as a restore method: the fixed side and the routing biases/norms are PRE's bytes, the
    free side's weight rows are solved per head (see :mod:`qkrestore.qkpro.closed_form`)."""

    options: PlanOptions = field(default_factory=PlanOptions)
    fix: str = "key"
    ridge: float = 1.0
    device: str = "auto"
    form: str = "ridge"
    name: str = METHOD_PRO
    title: str = "QK-Pro"
    explanation: str = (
        "In the softmax-attention layers listed below, one routing side (W_Q or W_K) was taken from "
        "the pre-SFT checkpoint and the other solved per head in closed form: the matrix closest to "
        "the fine-tuned one whose routing bilinear form matches the pre-SFT one, relaxed by a "
        "ridge. Every other parameter is the fine-tuned checkpoint's, byte for byte."
    )

    def plan(self, pre: Checkpoint, post: Checkpoint) -> RestorePlan:
        return plan_pro(pre, post, self.options, self.fix, self.ridge, self.device, self.form)

    def compute(
        self, plan: RestorePlan, pre: Checkpoint, post: Checkpoint, scratch: Path
    ) -> ComputedStore:
        if not scratch.is_dir():
            raise OutputError(f"{scratch}: the folder for OUT does not exist")
        store = ComputedStore(scratch)
        try:
            t0 = time.perf_counter()
            store.stats = solve(plan, pre, post, store)
            store.stats["seconds"] = round(time.perf_counter() - t0, 4)
        except BaseException:
            store.close()
            raise
        return store


def plan_pro(
    pre: Checkpoint,
    post: Checkpoint,
    opts: PlanOptions,
    fix: str,
    ridge: float,
    device: str,
    form: str = "ridge",
) -> RestorePlan:
    if fix not in ("key", "query"):
        raise PlanError(f"--fix {fix!r}: use 'key' or 'query'")
    if form not in FORMS:
        raise PlanError(f"--form {form!r}: use {' or '.join(FORMS)}")
    if not ridge >= 0:
        raise PlanError(f"--ridge {ridge}: must be ≥ 0")
    try:
        resolve_device(device)
    except ValueError as exc:
        raise PlanError(f"--device {device}: {exc}") from None
    if opts.tensor_pattern is not None:
        raise PlanError("--tensor-pattern cannot be used with pro: QK-Pro needs the family's heads")
    plan = build_plan(pre, post, dataclasses.replace(opts, targets=("q", "k")), method=METHOD_PRO)
    missing = layer_map(post.config).family.no_head_pairs
    if missing:
        raise PlanError(
            f"QK-Pro is not defined for {missing} ({plan.adapter})",
            hint="use 'qkrestore merge' (QK-Restore) for this model",
        )
    heads = text_config(post.config).get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        raise PlanError("config.json: QK-Pro needs 'num_attention_heads' to split W_Q into heads")
    free = "q" if fix == "key" else "k"
    patches: list[TensorPatch] = []
    for p in plan.patches:
        if p.role == "weight" and not {p.dtype, p.pre_dtype} <= FLOAT_DTYPES:
            # Both sides of both weights enter the solve; an integer tensor is no W_Q or W_K.
            dtype = p.pre_dtype if p.pre_dtype not in FLOAT_DTYPES else p.dtype
            raise PlanError(f"'{p.name}': QK-Pro needs float weights, not {dtype}")
        if p.target == free and p.role == "weight":
            if p.dtype not in FLOAT_DTYPES or p.dtype.startswith("F8"):
                raise PlanError(f"'{p.name}': QK-Pro needs a float weight, not {p.dtype}")
            p = dataclasses.replace(p, source="computed")
        patches.append(p)
    plan.patches = patches
    for layer in plan.layers:
        for target in ("q", "k"):
            n = sum(
                1 for p in patches if p.layer == layer and p.target == target and p.role == "weight"
            )
            if n != 1:
                raise PlanError(
                    f"layer {layer}: QK-Pro needs exactly one W_{target.upper()} weight, found {n}"
                )
    plan.params.update({"fix": fix, "ridge": ridge, "device": device})
    if form != "ridge":  # the cross-gram form has no ridge; plans without "form" are ridge plans
        del plan.params["ridge"]
        plan.params["form"] = form
    return plan


def _weight(plan: RestorePlan, layer: int, target: str) -> TensorPatch:
    return next(
        p for p in plan.patches if p.layer == layer and p.target == target and p.role == "weight"
    )


class ComputedStore(Mapping[str, bytes]):
    """Solved rows (already in POST's dtype), kept in an anonymous temporary file."""

    def __init__(self, folder: Path) -> None:
        self.stats: dict[str, Any] = {}
        # Closed by close(), which the caller runs in a finally block.
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".qkrestore-pro-")  # noqa: SIM115
        self._where: dict[str, tuple[int, int]] = {}
        self._end = 0

    def put(self, name: str, data: bytes) -> None:
        os.pwrite(self._file.fileno(), data, self._end)
        self._where[name] = (self._end, len(data))
        self._end += len(data)

    def __getitem__(self, name: str) -> bytes:
        offset, length = self._where[name]
        return os.pread(self._file.fileno(), length, offset)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._file.close()


# The rows of one layer a solve needs: the free side in PRE and in POST, the fixed side in PRE.
LayerRows = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]


def solve(
    plan: RestorePlan, pre: Checkpoint, post: Checkpoint, store: ComputedStore
) -> dict[str, Any]:
    """Solve every planned layer of a checkpoint POST into ``store`` (POST's dtype, as bytes)."""
    free, fixed = free_and_fixed(plan)

    def rows(layer: int) -> LayerRows:
        fp, xp = _weight(plan, layer, free), _weight(plan, layer, fixed)
        return (
            read_rows(pre, fp.pre_name, fp.rows),
            read_rows(post, fp.name, fp.rows),
            read_rows(pre, xp.pre_name, xp.rows),
        )

    def put(layer: int, solved: torch.Tensor) -> None:
        fp = _weight(plan, layer, free)
        store.put(fp.name, to_bytes(solved, fp.dtype))

    return solve_layers(
        plan, int(text_config(post.config).get("num_attention_heads") or 0), rows, put
    )


def free_and_fixed(plan: RestorePlan) -> tuple[str, str]:
    """The targets (``q``/``k``) of the solved side and of the side held at PRE."""
    return ("q", "k") if plan.params["fix"] == "key" else ("k", "q")


def solve_layers(
    plan: RestorePlan,
    n_heads: int,
    rows: Callable[[int], LayerRows],
    put: Callable[[int, torch.Tensor], None],
    *,
    layers: Sequence[int] | None = None,
    name: Callable[[int], str] | None = None,
) -> dict[str, Any]:
    """QK-Pro's head split and batching, for every input kind (checkpoint rows, LoRA factors).

    ``rows(layer)`` gives one planned layer's (free PRE, free POST, fixed PRE) rows; layers of equal
    shapes are solved together in batches of at most :data:`BATCH_BYTES`, and ``put(layer, rows)``
    receives the solved free rows. The form (ridge or cross-gram) and its parameters are the plan's.
    ``layers`` defaults to the plan's. A solve that yields a non-finite value is refused, naming
    the tensor (``name(layer)``, default the free side's weight), before anything is put.
    """
    import torch

    fix, form = plan.params["fix"], plan.params.get("form", "ridge")
    device = resolve_device(plan.params["device"])
    if n_heads <= 0:
        raise PlanError("config.json: 'num_attention_heads' is needed for QK-Pro")
    free, fixed = free_and_fixed(plan)
    batch: list[tuple[int, LayerRows]] = []
    shape: tuple[Any, ...] | None = None
    size = 0
    stats: dict[str, Any] = {"layers": 0, "systems": 0}

    def flush() -> None:
        if not batch:
            return
        free_pre = [r[0] for _, r in batch]
        free_post = [r[1] for _, r in batch]
        fixed_pre = [r[2] for _, r in batch]
        layer0 = batch[0][0]
        q_rows = (free_pre if free == "q" else fixed_pre)[0].shape[0]
        k_rows = (fixed_pre if free == "q" else free_pre)[0].shape[0]
        d_h, rem = divmod(q_rows, n_heads)
        if rem or d_h == 0 or k_rows % d_h:
            raise PlanError(
                f"layer {layer0}: {q_rows} query rows and {k_rows} key rows do not split into "
                f"{n_heads} heads of equal size"
            )
        n_kv = k_rows // d_h
        if n_heads % n_kv:
            raise PlanError(f"layer {layer0}: {n_heads} query heads over {n_kv} KV groups")
        if form == "cross-gram":
            solved = solve_cross_gram_batched(
                fix, free_pre, free_post, fixed_pre, n_heads, n_kv, device=device
            )
        else:
            ridge = float(plan.params["ridge"])
            solved = solve_heads(
                fix, free_pre, free_post, fixed_pre, n_heads, n_kv, ridge, device=device
            )
        for (layer, _), out in zip(batch, solved):
            if not bool(torch.isfinite(out).all()):
                what = name(layer) if name else _weight(plan, layer, free).name
                raise PlanError(
                    f"'{what}': QK-Pro's solution is not finite (NaN or Inf)",
                    hint="check PRE's and POST's weights of this layer for NaN/Inf",
                )
            put(layer, out)
        stats["layers"] += len(batch)
        stats["systems"] += len(batch) * (n_heads if fix == "key" else n_kv)
        batch.clear()

    for layer in plan.layers if layers is None else layers:
        got = rows(layer)
        for side, target, t in zip(("PRE", "POST", "PRE"), (free, free, fixed), got):
            if nonfinite(t):  # refused by name here, not as a failed solve (or an internal error)
                raise PlanError(
                    f"'{_weight(plan, layer, target).name}': {side}'s values are not finite (NaN or Inf), "
                    "so QK-Pro cannot solve this layer",
                    hint="the file is damaged or the training diverged",
                )
        key = tuple((tuple(t.shape), t.dtype) for t in got)
        nbytes = 8 * sum(t.numel() for t in got)
        if batch and (key != shape or size + nbytes > BATCH_BYTES):
            flush()
            size = 0
        shape = key
        batch.append((layer, got))
        size += nbytes
    flush()
    stats["device"] = str(device)
    return stats


__all__ = ["METHOD_PRO", "ComputedStore", "QKPro", "plan_pro", "solve", "solve_layers"]
