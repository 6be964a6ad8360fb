"""A PEFT adapter as an input kind of :func:`qkrestore.job.run_job`, and its inspect and verify.

``run_job`` opens PRE, checks OUT and plans with the method object as for any POST; what is
particular to an adapter lives here as plain functions: opening it as an untrusted input
(:func:`open_adapter_input`), reading the plan module by module (:func:`plan_adapter_job`), writing
the edited adapter through the writer's staging and fsync (:func:`write_adapter_output`), and
PRE + adapter merged as a checkpoint POST for ``--merge-adapter`` (:func:`merged_post`). No printing.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PlanError, QKRestoreError, VerifyError
from ..io.checkpoint import Checkpoint
from ..io.sourcefiles import folder_files
from ..io.tensors import check_finite
from ..surgery.card import ADAPTER, ADAPTER_JOB_KEY, source_paths
from ..surgery.plan import PlanOptions, RestorePlan, build_plan
from ..surgery.writer import WriteOptions, check_free_space, staged_output
from .config import CONFIG_NAME, read_adapter_config
from .edit import compute_edits, read_tensor
from .plan import DROP, KEEP, SOLVE, AdapterPlan, check_base, plan_adapter
from .reader import LoraAdapter, open_adapter
from .write import merged_weight, write_adapter, write_model

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
JOB_KEY = ADAPTER_JOB_KEY


def base_name_check(base: str | None, pre_source: str, pre_root: Path) -> str | None:
    """Refuse an adapter that names another base than PRE; return a note when it cannot tell.

    A path that exists must be PRE's folder; a Hub id must be PRE's repo id when PRE comes from the
    Hub. A Hub id against a local PRE cannot be compared (local copies are named freely): the
    shapes of every module are still checked, and the user is told.
    """
    if not base:
        return None
    norm = base.removeprefix("hf://").split("@")[0].rstrip("/")
    base_path = Path(base).expanduser()
    if base_path.exists():
        if base_path.resolve() != pre_root.resolve():
            raise PlanError(
                f"the adapter's base_model_name_or_path is {base} but PRE is {pre_source}",
                hint="pass the base model the adapter was trained on as PRE",
            )
        return None
    pre_id = pre_source.removeprefix("hf://").split("@")[0].rstrip("/")
    if not Path(pre_source).exists():  # PRE is a Hub repo id
        if norm.lower() != pre_id.lower():
            raise PlanError(
                f"the adapter was trained on {base} but PRE is {pre_source}",
                hint="pass the base model the adapter was trained on as PRE",
            )
        return None
    if norm.rsplit("/", 1)[-1].lower() == pre_root.resolve().name.lower():
        return None
    return (
        f"the adapter names its base '{base}'; PRE is the local folder {pre_root}: the name cannot "
        "be compared, every module's shape was checked"
    )


def open_adapter_input(root: Path) -> LoraAdapter:
    """POST as a PEFT adapter, for a job: an untrusted folder like any checkpoint folder (every
    file it holds passes :func:`qkrestore.io.sourcefiles.folder_files`: no link leaving it, no FIFO or
    device), and finite factors (a NaN in ``lora_B`` is refused, naming the tensor)."""
    try:
        folder_files(Path(root))
        adapter = open_adapter(root)
    except QKRestoreError as exc:
        exc.message = f"POST: {exc.message}"
        raise
    try:
        for key in adapter.weights.tensors:
            check_finite(adapter.weights, key)
    except BaseException:
        adapter.close()
        raise
    return adapter


def plan_adapter_job(
    adapter: LoraAdapter, plan: RestorePlan, pre: Checkpoint, pre_source: str, merge: bool
) -> tuple[AdapterPlan, list[str]]:
    """The method's plan read module by module, refused unless the output can be written;
    returns the per-module plan and notes."""
    notes = [n for n in [base_name_check(adapter.config.base_model, pre_source, pre.root)] if n]
    check_base(adapter, pre.tensors, str(pre.root))
    aplan = plan_adapter(adapter, plan, solve_here=not merge)
    _check_writable(adapter, aplan, pre, merge)
    if not any(a.action != KEEP for a in aplan.actions):
        notes.append("no module of the adapter lies in a planned layer: OUT equals the input")
    return aplan, notes


def write_adapter_output(
    out: Path,
    write: WriteOptions,
    pre: Checkpoint,
    adapter: LoraAdapter,
    aplan: AdapterPlan,
    pre_id: str | None,
    finalize: Callable[[Path, dict[str, Any]], None],
) -> dict[str, Any]:
    """Adapter out: the edited adapter, written like every output (staging folder, every file and
    folder fsynced, atomic rename); ``finalize`` adds the card and provenance before the rename."""
    edits = compute_edits(adapter, aplan, pre)
    with staged_output(out, write.overwrite) as (tmp, _synced):
        written = write_adapter(tmp, adapter, aplan, edits, pre_id, write.jobs)
        if edits.solve_stats:
            written["solve"] = edits.solve_stats
        finalize(tmp, written)
    return written


@contextlib.contextmanager
def merged_post(
    pre: Checkpoint,
    adapter: LoraAdapter,
    parent: Path,
    jobs: int,
    progress: Progress | None = None,
) -> Iterator[Path]:
    """POST = PRE + the adapter, every module merged, in a hidden folder beside OUT (removed after).

    With ``--merge-adapter`` the output is a full checkpoint, so POST is just a checkpoint: the job
    then runs the method on (PRE, this folder) exactly as on any checkpoint pair.
    """
    check_free_space(parent, pre.total_bytes)
    folder = Path(tempfile.mkdtemp(prefix=".qkrestore-merged-", dir=parent))
    try:
        aplan = plan_adapter(adapter, build_plan(pre, pre, PlanOptions(layers=[])))
        write_model(folder, pre, adapter, aplan, compute_edits(adapter, aplan, pre), progress, jobs)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_merged_post(
    pre_root: str | Path, adapter_root: str | Path, folder: Path, jobs: int = WriteOptions().jobs
) -> Path:
    """POST = PRE + the adapter, every module merged (nothing restored), in PRE's layout.

    What ``sweep`` loads as POST when POST is an adapter: the same merge as ``--merge-adapter``.
    """
    with (
        _labelled("PRE", Checkpoint.open, pre_root) as pre,
        _labelled("POST", open_adapter_input, adapter_root) as adapter,
    ):
        check_base(adapter, pre.tensors, str(pre.root))
        plan = build_plan(pre, pre, PlanOptions(layers=[]))
        aplan = plan_adapter(adapter, plan)
        folder.mkdir(parents=True, exist_ok=True)
        write_model(folder, pre, adapter, aplan, compute_edits(adapter, aplan, pre), None, jobs)
    return folder


def _labelled(label: str, opener: Callable[[Any], Any], path: Any) -> Any:
    """Open an input, naming the side in its error (``PRE: …``), as the checkpoint jobs do."""
    try:
        return opener(path)
    except QKRestoreError as exc:
        if not exc.message.startswith(f"{label}: "):
            exc.message = f"{label}: {exc.message}"
        raise


def _check_writable(
    adapter: LoraAdapter, aplan: AdapterPlan, pre: Checkpoint, merge_adapter: bool
) -> None:
    """Refuse outputs that cannot be written: an empty adapter, a saved tensor PRE lacks."""
    if merge_adapter:
        for name, key in adapter.saved.items():
            if name not in pre.tensors:
                raise PlanError(
                    f"{adapter.file}: saved tensor '{key}' replaces '{name}', which PRE does not "
                    "store (tied weights?)",
                    hint="write an adapter instead (leave out --merge-adapter)",
                )
        return
    if not adapter.saved and all(a.action == DROP for a in aplan.actions):
        raise PlanError(
            f"{adapter.file}: every module of the adapter lies in the routing set of the planned "
            "layers, so the QK-Restore adapter would be empty (POST restored is PRE itself)",
            hint="use PRE as it is, or choose fewer layers with --layers",
        )


# -- inspect --------------------------------------------------------------------------------------


def inspect_adapter(
    adapter_root: str | Path, base: str | Path | None, *, include_sliding: bool = False
) -> dict[str, Any]:
    """Which LoRA modules fall in global softmax layers, and what QK-Restore would do to each.

    Without ``base`` only the adapter's own facts are known (modules, ranks, scales): layer kinds
    live in the base model's config.
    """
    with open_adapter(adapter_root) as adapter:
        modules = [
            {
                "module": m.name,
                "rank": m.rank,
                "scaling": m.scaling,
                "dora": m.magnitude is not None,
                "shape": list(m.delta_shape),
            }
            for m in adapter.modules.values()
        ]
        doc: dict[str, Any] = {
            "path": str(adapter.root),
            "peft_type": "LORA",
            "base_model": adapter.config.base_model,
            "use_dora": adapter.config.use_dora,
            "use_rslora": adapter.config.use_rslora,
            "modules_to_save": list(adapter.saved),
            "adapter_bytes": adapter.file.stat().st_size,
            "modules": modules,
        }
        if base is None:
            return doc
        with Checkpoint.open(base) as pre:
            check_base(adapter, pre.tensors, str(pre.root))
            plan = build_plan(pre, pre, PlanOptions(include_sliding=include_sliding))
            aplan = plan_adapter(adapter, plan)
        actions = aplan.by_module()
        for m in modules:
            act = actions[str(m["module"])]
            m.update({"action": act.action, "layer": act.layer, "target": act.target})
            m["rows"] = [list(r) for r in act.rows]
        doc |= {
            "base": str(base),
            "model_type": plan.model_type,
            "layer_kinds": plan.layer_kinds,
            "global_layers": plan.layers,
            "counts": aplan.to_json()["counts"],
            "saved": [a.to_json() for a in aplan.actions if a.saved],
        }
        return doc


# -- verify ---------------------------------------------------------------------------------------


def is_adapter_record(record: dict[str, Any]) -> bool:
    return JOB_KEY in record


def verify_adapter_output(
    out: str | Path, record: dict[str, Any], pre: Path | None = None, post: Path | None = None
) -> dict[str, Any]:
    """Re-check an adapter job's OUT against PRE and the input adapter, tensor by tensor.

    Merged with PRE, OUT's restored rows must equal PRE's and every other row PRE + the original
    adapter (float32, relative tolerance 1e-5: the adapter output is merged by whoever loads it).
    QK-Pro's solved rows are only checked to be finite. Raises :class:`VerifyError` on a mismatch.
    """
    import torch

    out = Path(out)
    pre_root, post_root = source_paths(out, record, pre, post)
    kind = record[JOB_KEY]["output_kind"]
    plan = RestorePlan.from_json(record["plan"])
    restore = {p.name: p.rows for p in plan.patches if p.source == "pre"}
    checked = 0
    with Checkpoint.open(pre_root) as pre_ck, open_adapter(post_root) as orig:
        aplan = plan_adapter(orig, plan, solve_here=kind == ADAPTER)
        solved = {a.module for a in aplan.actions if a.action == SOLVE}
        new = open_adapter(out) if kind == "adapter" else None
        got_ck = Checkpoint.open(out) if kind == "model" else None
        try:
            if new is not None:
                cfg = read_adapter_config(out)
                for name in orig.modules:
                    if (name in new.modules) != cfg.targets(name):
                        raise VerifyError(
                            f"{out / CONFIG_NAME}: module '{name}' is "
                            f"{'kept' if name in new.modules else 'dropped'} but the config "
                            f"{'does not select' if name in new.modules else 'still selects'} it"
                        )
            names = sorted(
                {m.weight_name for m in orig.modules.values()} | set(orig.saved) | set(restore)
            )
            for name in names:
                if name not in pre_ck.tensors:
                    continue
                want = _merged(pre_ck, orig, name).to(torch.float32)
                if got_ck is not None:
                    got = read_tensor(got_ck, name).to(torch.float32)
                elif new is not None:
                    got = _merged(pre_ck, new, name).to(torch.float32)
                else:
                    raise VerifyError(f"{out}: unknown output kind {kind!r}")
                base = read_tensor(pre_ck, name).to(torch.float32)
                mask = torch.zeros(want.shape[0], dtype=torch.bool)
                for r0, r1 in restore.get(name, ()):
                    mask[r0:r1] = True
                    _close(got[r0:r1], base[r0:r1], out, name, "PRE's", exact=got_ck is not None)
                if name.removesuffix(".weight") in solved:
                    pro_rows = next(p for p in plan.patches if p.name == name).rows
                    for r0, r1 in pro_rows:
                        mask[r0:r1] = True
                    if not bool(torch.isfinite(got).all()):
                        raise VerifyError(f"{out}: '{name}': solved rows are not finite")
                keep = ~mask
                _close(got[keep], want[keep], out, name, "PRE + the input adapter's", exact=False)
                checked += 1
        finally:
            if new is not None:
                new.close()
            if got_ck is not None:
                got_ck.close()
    return {"ok": True, "output_kind": kind, "tensors_checked": checked, "output": str(out)}


def _merged(pre: Checkpoint, adapter: LoraAdapter, name: str) -> torch.Tensor:
    """PRE's tensor ``name`` with ``adapter`` applied (as peft merges it), in PRE's dtype."""
    w = read_tensor(pre, name)
    key = adapter.saved.get(name)
    if key is not None:
        w = read_tensor(adapter.weights, key).to(w.dtype)
    mod = adapter.modules.get(name.removesuffix(".weight"))
    if mod is None or mod.weight_name != name:
        return w
    a, b = read_tensor(adapter.weights, mod.a.name), read_tensor(adapter.weights, mod.b.name)
    m = read_tensor(adapter.weights, mod.magnitude.name) if mod.magnitude is not None else None
    return merged_weight(w, mod, a, b, m).to(w.dtype)


def _close(
    got: torch.Tensor, want: torch.Tensor, out: Path, name: str, what: str, exact: bool
) -> None:
    import torch

    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    if bool(bad_got.any()) or bool(bad_want.any()):
        # Reported, never compared: a tolerance computed from NaN is no tolerance.
        where = "OUT and " + what if bool(bad_want.any()) else "OUT (not " + what + ")"
        raise VerifyError(f"{out}: tensor '{name}': NaN or Inf values in {where} rows")
    if exact:
        ok = torch.equal(got, want)
    else:
        scale = float(want.abs().max()) if want.numel() else 0.0
        ok = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6 * max(scale, 1e-30)))
    if not ok:
        raise VerifyError(f"{out}: tensor '{name}': rows differ from {what}")


__all__ = [
    "inspect_adapter",
    "is_adapter_record",
    "merged_post",
    "open_adapter_input",
    "plan_adapter_job",
    "verify_adapter_output",
    "write_adapter_output",
    "write_merged_post",
]
