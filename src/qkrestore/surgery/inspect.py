"""What ``inspect-layers`` reports: the layer map, the routing tensors, and Q/K drift between two models."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import PlanError
from ..families import ROUTING_TARGETS, layer_map
from ..io.checkpoint import Checkpoint
from ..io.dtypes import FLOAT_DTYPES
from ..io.tensors import read_rows


@dataclass
class LayerReport:
    """What ``inspect-layers`` reports (and ``--json`` prints): family, layer map, routing tensors.

    ``layers`` holds one entry per softmax-attention layer with its routing tensors (name, target,
    role, rows, shape, dtype, file); ``compare`` the Q/K drift against another model, when asked.
    """

    path: str
    model_type: str
    adapter: str
    adapter_reason: str
    adapter_description: str
    adapter_notes: list[str]
    num_layers: int
    layer_prefix: str
    global_layers: list[int]
    local_layers: list[int]
    layer_reasons: list[str]  # one line per layer: why it is global, local or not attention
    layers: list[dict[str, Any]]
    weight_files: dict[str, Any]  # which files the loader reads, and why (see weightfiles.py)
    compare: dict[str, Any] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        if doc["compare"] is None:
            del doc["compare"]
        return doc


def describe(ckpt: Checkpoint) -> LayerReport:
    """The model's family, layer kinds, and every softmax layer's routing tensors with row ranges."""
    lmap = layer_map(ckpt.config, ckpt.tensors)
    layers = []
    for i in lmap.softmax_layers:
        tensors = []
        for rt in lmap.routing(i, ROUTING_TARGETS):
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
        layers.append({"layer": i, "kind": lmap.kinds[i].value, "tensors": tensors})
    return LayerReport(
        path=str(ckpt.root),
        model_type=lmap.model_type,
        adapter=lmap.family.name,
        adapter_reason=lmap.reason,
        adapter_description=lmap.family.description,
        adapter_notes=list(lmap.family.notes),
        num_layers=len(lmap.kinds),
        layer_prefix=lmap.prefix,
        global_layers=lmap.global_layers,
        local_layers=lmap.local_layers,
        layer_reasons=list(lmap.reasons),
        layers=layers,
        weight_files=ckpt.weight_files(),
    )


def compare(ref: Checkpoint, other: Checkpoint, report: LayerReport) -> list[dict[str, Any]]:
    """Relative drift ‖W_other − W_ref‖_F / ‖W_ref‖_F of the Q and K weight rows of each softmax layer.

    Where a target has several weight tensors (Kimi's K rows in two projections, Zamba2's adapters),
    they count together: squared norms are summed before the ratio.
    """
    import torch

    out = []
    for layer in report.layers:
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
