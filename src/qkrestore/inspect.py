"""What ``inspect-layers`` reports: the layer map, the routing tensors, and Q/K drift between two models."""

from __future__ import annotations

from typing import Any

from .adapters import ROUTING_TARGETS, Kind, resolve
from .checkpoint import Checkpoint
from .dtypes import FLOAT_DTYPES
from .errors import PlanError
from .tensors import read_rows


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """The model's family, layer kinds, and every softmax layer's routing tensors with row ranges."""
    resolved = resolve(ckpt.config)
    adapter = resolved.adapter
    kinds = adapter.layer_kinds(ckpt.config)
    prefix = adapter.layer_prefix(list(ckpt.tensors))
    layers = []
    for i, kind in enumerate(kinds):
        if kind is Kind.OTHER:
            continue
        tensors = []
        for rt in adapter.layer_tensors(ckpt.config, i, ckpt.tensors, ROUTING_TARGETS, prefix):
            info = ckpt.tensors[rt.name]
            tensors.append(
                {
                    "name": rt.name,
                    "target": rt.target,
                    "role": rt.role,
                    "rows": [list(r) for r in rt.rows],
                    "shape": list(info.shape),
                    "dtype": info.dtype,
                    "file": info.file,
                }
            )
        layers.append({"layer": i, "kind": kind.value, "tensors": tensors})
    return {
        "path": str(ckpt.root),
        "model_type": resolved.model_type,
        "adapter": adapter.name,
        "adapter_reason": resolved.reason,
        "adapter_description": adapter.description,
        "adapter_notes": list(adapter.notes),
        "num_layers": len(kinds),
        "layer_prefix": prefix,
        "global_layers": [i for i, k in enumerate(kinds) if k is Kind.GLOBAL],
        "local_layers": [i for i, k in enumerate(kinds) if k is Kind.LOCAL],
        "layers": layers,
        "weight_files": ckpt.weight_files(),
    }


def compare(
    ref: Checkpoint, other: Checkpoint, description: dict[str, Any]
) -> list[dict[str, Any]]:
    """Relative drift ‖W_other − W_ref‖_F / ‖W_ref‖_F of the Q and K weight rows of each softmax layer.

    Where a target has several weight tensors (Kimi's K rows in two projections, Zamba2's adapters),
    they count together: squared norms are summed before the ratio.
    """
    import torch

    out = []
    for layer in description["layers"]:
        row: dict[str, Any] = {"layer": layer["layer"], "kind": layer["kind"]}
        sums: dict[str, list[float]] = {}
        for t in layer["tensors"]:
            if t["role"] not in ("weight", "adapter") or t["dtype"] not in FLOAT_DTYPES:
                continue
            if t["name"] not in other.tensors:
                raise PlanError(f"{other.root}: no tensor '{t['name']}' to compare")
            if list(other.tensors[t["name"]].shape) != t["shape"]:
                raise PlanError(f"'{t['name']}': shapes differ between the two models")
            a = read_rows(ref, t["name"], t["rows"], torch.float64)
            b = read_rows(other, t["name"], t["rows"], torch.float64)
            acc = sums.setdefault(t["target"], [0.0, 0.0])
            acc[0] += float(torch.linalg.norm(b - a)) ** 2
            acc[1] += float(torch.linalg.norm(a)) ** 2
        for target, (diff, ref_sq) in sums.items():
            row[target] = (diff / ref_sq) ** 0.5 if ref_sq else float("nan")
        out.append(row)
    return out
