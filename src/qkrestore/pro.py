"""The ``pro`` job: QK-Pro on top of the restore plan.

The plan is the same as ``merge``'s (same layers, same routing tensors, same row ranges); the only
difference is that the weight rows of the *free* side (W_Q with ``--fix key``, W_K with
``--fix query``) are marked ``computed`` and solved in closed form by :mod:`qkrestore.pro_math`.
The fixed side, and every bias and q/k norm of the routing set, still come from PRE byte for byte.

Solved rows are cast to POST's dtype and spilled to a temporary file next to OUT, so memory holds
one batch of layers at a time rather than every solved tensor of the model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from .adapters import text_config
from .checkpoint import Checkpoint
from .dtypes import FLOAT_DTYPES, to_bytes
from .errors import PlanError
from .merge import MergeOptions
from .plan import METHOD_PRO, RestorePlan, TensorPatch, build_plan
from .pro_math import (
    resolve_device,
    solve_cross_gram_batched,
    solve_fix_key_batched,
    solve_fix_query_batched,
)
from .tensors import read_rows

# Families whose softmax layers have no single W_Q/W_K pair per head (MLA's low-rank K, Zamba2's
# shared blocks with per-layer adapters): the closed form is not defined there.
UNSUPPORTED = {"kimi_linear": "MLA layers", "zamba2": "shared blocks with LoRA adapters"}
BATCH_BYTES = 1 << 30
FORMS = ("ridge", "cross-gram")  # pro --form: docs/qk-pro.md derives both


def plan_pro(
    pre: Checkpoint,
    post: Checkpoint,
    opts: MergeOptions,
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
    plan = build_plan(
        pre,
        post,
        layers=opts.layers,
        include_sliding=opts.include_sliding,
        targets=("q", "k"),
        allow_arch_mismatch=opts.allow_arch_mismatch,
        method=METHOD_PRO,
        options=opts.adapter_options,
    )
    if plan.adapter in UNSUPPORTED:
        raise PlanError(
            f"QK-Pro is not defined for {UNSUPPORTED[plan.adapter]} ({plan.adapter})",
            hint="use 'qkrestore merge' (QK-Restore) for this model",
        )
    heads = text_config(post.config).get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        raise PlanError("config.json: QK-Pro needs 'num_attention_heads' to split W_Q into heads")
    free = "q" if fix == "key" else "k"
    patches: list[TensorPatch] = []
    for p in plan.patches:
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


def solve(
    plan: RestorePlan, pre: Checkpoint, post: Checkpoint, store: ComputedStore
) -> dict[str, float]:
    """Solve every planned layer, in batches of layers of equal shape, into ``store``."""
    fix, form = plan.params["fix"], plan.params.get("form", "ridge")
    device = resolve_device(plan.params["device"])
    n_heads = int(text_config(post.config).get("num_attention_heads") or 0)
    if n_heads <= 0:
        raise PlanError("config.json: 'num_attention_heads' is needed for QK-Pro")
    free, fixed = ("q", "k") if fix == "key" else ("k", "q")

    batch: list[int] = []
    shape: tuple | None = None
    size = 0
    stats = {"layers": 0, "systems": 0}

    def flush() -> None:
        if not batch:
            return
        free_pre, free_post, fixed_pre, names = [], [], [], []
        for layer in batch:
            fp, xp = _weight(plan, layer, free), _weight(plan, layer, fixed)
            free_pre.append(read_rows(pre, fp.pre_name, fp.rows))
            free_post.append(read_rows(post, fp.name, fp.rows))
            fixed_pre.append(read_rows(pre, xp.pre_name, xp.rows))
            names.append(fp)
        q_rows = (free_pre if free == "q" else fixed_pre)[0].shape[0]
        k_rows = (fixed_pre if free == "q" else free_pre)[0].shape[0]
        d_h, rem = divmod(q_rows, n_heads)
        if rem or d_h == 0 or k_rows % d_h:
            raise PlanError(
                f"layer {batch[0]}: {q_rows} query rows and {k_rows} key rows do not split into "
                f"{n_heads} heads of equal size"
            )
        n_kv = k_rows // d_h
        if n_heads % n_kv:
            raise PlanError(f"layer {batch[0]}: {n_heads} query heads over {n_kv} KV groups")
        if form == "cross-gram":
            solved = solve_cross_gram_batched(
                fix, free_pre, free_post, fixed_pre, n_heads, n_kv, device=device
            )
        else:
            fn = solve_fix_key_batched if fix == "key" else solve_fix_query_batched
            ridge = float(plan.params["ridge"])
            solved = fn(free_pre, free_post, fixed_pre, n_heads, n_kv, ridge, device=device)
        for patch, rows in zip(names, solved):
            store.put(patch.name, to_bytes(rows, patch.dtype))
        stats["layers"] += len(batch)
        stats["systems"] += len(batch) * (n_heads if fix == "key" else n_kv)
        batch.clear()

    for layer in plan.layers:
        fp, xp = _weight(plan, layer, free), _weight(plan, layer, fixed)
        key = (fp.row_count(), fp.shape[1:], xp.row_count(), xp.shape[1:])
        nbytes = 8 * (2 * fp.row_count() + xp.row_count()) * math.prod(fp.shape[1:])
        if batch and (key != shape or size + nbytes > BATCH_BYTES):
            flush()
            size = 0
        shape = key
        batch.append(layer)
        size += nbytes
    flush()
    stats["device"] = str(device)
    return stats


__all__ = ["METHOD_PRO", "ComputedStore", "plan_pro", "solve"]
