"""Candidate restore plans, built in memory and applied to one loaded model.

Why: ``sweep`` and ``select-layers`` compare many ways of restoring (or ablating) the routing of a
model, and writing a checkpoint per candidate would cost a full copy of the model each time. Each
candidate here is planned by the same method objects the job pipeline runs
(:class:`qkrestore.surgery.methods.QKRestore`, :class:`qkrestore.qkpro.method.QKPro`) and solved with the same
QK-Pro code path (:func:`qkrestore.qkpro.method.solve`) that ``merge``/``pro`` use, so the rows copied into the loaded model are exactly the rows those
commands would write: a candidate held in memory and the checkpoint written for the same options
give the same logits (tested).

Memory: one model, plus POST's original values of the tensors any candidate touched (the routing
tensors of the planned layers), kept on the CPU to undo a candidate before the next one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from ..io.checkpoint import Checkpoint
from ..io.dtypes import FLOAT_DTYPES, to_tensor, torch_dtype
from ..io.tensors import read_rows
from ..surgery.methods import QKRestore
from ..surgery.plan import PlanOptions, RestorePlan, TensorPatch

if TYPE_CHECKING:
    import torch

    from ..qkpro.method import QKPro


@dataclass(frozen=True)
class Candidate:
    """One way of building the model from PRE and POST, named for tables, ``--pick`` and JSON.

    ``kind`` is ``pre`` or ``post`` (a checkpoint as it is), ``restore`` (``merge`` with
    ``layers``/``targets``) or ``pro`` (``pro`` with ``fix``, ``ridge`` or the cross-gram form).
    ``layers=None`` means the planner's own choice (every global softmax layer).
    """

    name: str
    kind: str
    layers: tuple[int, ...] | None = None
    targets: tuple[str, ...] = ("q", "k")
    fix: str | None = None
    ridge: float | None = None
    form: str = "ridge"
    group: str = ""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, "group": self.group}
        if self.kind in ("restore", "pro"):
            d["layers"] = list(self.layers) if self.layers is not None else "auto"
        if self.kind == "restore":
            d["targets"] = list(self.targets)
        if self.kind == "pro":
            d["fix"] = self.fix
            d["form"] = self.form
            if self.form == "ridge":
                d["ridge"] = self.ridge
        return d

    def recipe(self, planned_layers: list[int], include_sliding: bool = False) -> dict[str, Any]:
        """Recipe keys for ``merge --config`` / ``pro --config`` (the command is ``command()``)."""
        if self.kind not in ("restore", "pro"):
            raise PlanError(
                f"the picked candidate '{self.name}' is a checkpoint as it is: there is no "
                "restore recipe to write",
                hint="use that checkpoint directly, or pick among restore/pro candidates",
            )
        out: dict[str, Any] = {"layers": list(planned_layers)}
        if include_sliding:
            out["include_sliding"] = True
        if self.kind == "restore":
            out["targets"] = list(self.targets)
            return out
        out["fix"] = self.fix
        if self.form == "ridge":
            out["ridge"] = self.ridge
        else:
            out["form"] = self.form
        return out

    def command(self) -> str:
        return "merge" if self.kind == "restore" else "pro"


# -- planning -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanSettings:
    """The options every candidate shares (those of ``merge``/``pro`` that are not swept)."""

    include_sliding: bool = False
    allow_arch_mismatch: bool = False
    device: str = "auto"
    adapter_options: Mapping[str, Any] = field(default_factory=dict)


def method_for(cand: Candidate, settings: PlanSettings) -> QKRestore | QKPro:
    """The method ``merge``/``pro`` would run for this candidate's options."""
    opts = PlanOptions(
        layers=list(cand.layers) if cand.layers is not None else None,
        include_sliding=settings.include_sliding,
        targets=cand.targets if cand.kind == "restore" else ("q", "k"),
        allow_arch_mismatch=settings.allow_arch_mismatch,
        adapter_options=dict(settings.adapter_options),
    )
    if cand.kind == "restore":
        return QKRestore(opts)
    if cand.kind == "pro":
        from ..qkpro.method import QKPro

        ridge = float(cand.ridge or 0.0)
        return QKPro(opts, str(cand.fix), ridge, settings.device, cand.form)
    raise PlanError(f"candidate '{cand.name}' has no plan (kind {cand.kind})")


def plan_candidate(
    cand: Candidate, pre: Checkpoint, post: Checkpoint, settings: PlanSettings
) -> RestorePlan:
    """The plan ``merge``/``pro`` would build for this candidate's options."""
    return method_for(cand, settings).plan(pre, post)


class MemoryStore(dict):
    """Where :func:`qkrestore.qkpro.method.solve` puts solved rows (POST's dtype, as bytes), in memory."""

    def put(self, name: str, data: bytes) -> None:
        self[name] = data


def _shape(patch: TensorPatch) -> tuple[int, ...]:
    return (patch.row_count(), *patch.shape[1:])


def plan_values(plan: RestorePlan, pre: Checkpoint, post: Checkpoint) -> dict[str, torch.Tensor]:
    """The rows the plan writes, per output tensor, concatenated in the plan's row order and in
    POST's dtype: PRE's rows cast as the writer casts them, or the QK-Pro solution as ``pro``
    stores it."""

    computed = MemoryStore()
    if any(p.source == "computed" for p in plan.patches):
        from ..qkpro.method import solve

        solve(plan, pre, post, computed)  # type: ignore[arg-type]
    out: dict[str, torch.Tensor] = {}
    for p in plan.patches:
        if p.dtype not in FLOAT_DTYPES or p.dtype.startswith("F8"):
            raise PlanError(
                f"'{p.name}': {p.dtype} tensors cannot be swapped into a loaded model",
                hint="sweep and select-layers need a float (F32/BF16/F16) checkpoint",
            )
        if p.source == "computed":
            out[p.name] = to_tensor(computed[p.name], p.dtype, _shape(p))
        else:
            rows = read_rows(pre, p.pre_name, p.rows)
            out[p.name] = rows if not p.cast else rows.to(torch_dtype(p.dtype))
    return out


def ablation_values(plan: RestorePlan) -> dict[str, torch.Tensor]:
    """Zeros for the query weight and bias rows of a ``targets=("q",)`` plan: Appendix M's ablation.

    With W_Q and its bias zero every query is zero (a q-norm of zero stays zero), so the layer's
    attention is uniform over the visible tokens: it can no longer look anything up.
    """
    import torch

    return {
        p.name: torch.zeros(_shape(p), dtype=torch_dtype(p.dtype))
        for p in plan.patches
        if p.target == "q" and p.role in ("weight", "bias")
    }


# -- applying to a loaded model -------------------------------------------------------------------


class ModelPatcher:
    """Copies planned rows into a loaded model's parameters and undoes them again.

    Checkpoint names are matched to parameter names exactly, or, for saves whose prefix differs
    from the loaded model's (VLM wrappers), by a unique suffix match; shapes must agree.
    """

    def __init__(self, model: Any) -> None:

        self.model = model
        self.params: dict[str, torch.Tensor] = {
            **dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False)),
        }
        self.saved: dict[str, torch.Tensor] = {}  # POST's values of touched tensors, on the CPU
        self.dirty: set[str] = set()
        self.resolved: dict[str, torch.Tensor] = {}  # checkpoint name → parameter

    def param(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.params.get(name)
        if t is None:
            hits = [n for n in self.params if n.endswith("." + name) or name.endswith("." + n)]
            if len(hits) != 1:
                raise PlanError(
                    f"'{name}': the loaded model has no parameter of that name "
                    f"({'several' if hits else 'no'} candidates by suffix)",
                    hint="this family's tensor names differ between the checkpoint and "
                    "transformers' model; use merge/pro and evaluate the outputs instead",
                )
            t = self.params[hits[0]]
        if t.device.type == "meta":
            raise PlanError(
                f"'{name}': offloaded by --device-map (its values live outside the model), so "
                "candidates cannot be swapped into it",
                hint="give the model enough GPU/CPU memory to hold every layer (--device-map "
                "auto uses all GPUs, then the CPU), or run without --device-map",
            )
        if tuple(t.shape) != tuple(shape):
            raise PlanError(
                f"'{name}': shape {list(shape)} in the checkpoint but {list(t.shape)} in the "
                "loaded model"
            )
        return t

    def reset(self) -> None:
        """Give every tensor a candidate changed back POST's values."""
        import torch

        with torch.no_grad():
            for name in sorted(self.dirty):
                self.resolved[name].copy_(self.saved[name])
        self.dirty.clear()

    def close(self) -> None:
        """Drop every reference to the model and the saved values (before loading another)."""
        self.params.clear()
        self.resolved.clear()
        self.saved.clear()
        self.dirty.clear()
        self.model = None

    def apply(self, plan: RestorePlan, values: Mapping[str, torch.Tensor]) -> None:
        """Reset to POST, then write ``values`` (from :func:`plan_values` or
        :func:`ablation_values`) into the plan's rows."""
        import torch

        self.reset()
        by_name = plan.by_name()
        with torch.no_grad():
            for name, value in values.items():
                patch = by_name[name]
                t = self.resolved.get(name)
                if t is None:
                    t = self.resolved[name] = self.param(name, patch.shape)
                if name not in self.saved:
                    self.saved[name] = t.detach().to("cpu", copy=True)
                self.dirty.add(name)
                pos = 0
                for r0, r1 in patch.rows:
                    n = r1 - r0
                    t[r0:r1].copy_(value[pos : pos + n].to(t.device, t.dtype))
                    pos += n
