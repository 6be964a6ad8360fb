"""Adapter jobs as plain functions: plan, write (adapter or model), inspect, verify. No printing.

The CLI calls :func:`run_adapter_job` when POST is a PEFT adapter folder; everything it prints comes
from the returned :class:`AdapterJobResult` (``to_json()``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .._version import __version__
from ..card import (
    CARD_NAME,
    PAPER,
    PROVENANCE_NAME,
    redact_command,
    source_paths,
    split_front_matter,
    write_local_record,
)
from ..checkpoint import Checkpoint
from ..errors import OutputError, PlanError, QKRestoreError, VerifyError
from ..plan import METHOD_PRO, METHOD_RESTORE, PlanOptions, RestorePlan, build_plan
from ..writer import (
    check_free_space,
    check_output_location,
    staging_dir,
)
from .config import CONFIG_NAME, read_adapter_config
from .edit import compute_edits, read_tensor
from .plan import DROP, KEEP, SOLVE, AdapterPlan, check_base, plan_adapter
from .reader import LoraAdapter, open_adapter
from .write import merged_weight, write_adapter, write_model

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
JOB_KEY = "adapter_job"


@dataclass
class AdapterJobResult:
    """What an adapter job planned and wrote; ``to_json`` is the CLI's ``--json`` document."""

    out: Path
    plan: RestorePlan
    adapter_plan: AdapterPlan
    merge_adapter: bool
    dry_run: bool
    sources: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    written: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    local_paths: dict[str, str] = field(default_factory=dict)  # never in the card or provenance

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "method": self.plan.method,
            "input": "peft-adapter",
            "output_kind": "model" if self.merge_adapter else "adapter",
            "dry_run": self.dry_run,
            "output": str(self.out),
            "sources": self.sources,
            "layers": self.plan.layers,
            "notes": self.notes,
            "adapter_plan": self.adapter_plan.to_json(),
            "written": self.written,
            "seconds": round(self.seconds, 4),
            "plan": self.plan.to_json(),
        }


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


def make_plan(
    pre: Checkpoint,
    *,
    method: str,
    layers: list[int] | None,
    include_sliding: bool,
    targets: tuple[str, ...],
    fix: str,
    ridge: float,
    device: str,
    adapter_options: dict[str, Any] | None,
    tensor_pattern: str | None = None,
) -> RestorePlan:
    """The family's plan with PRE on both sides (POST = PRE + adapter has PRE's layout)."""
    if method == METHOD_PRO:
        from ..qkpro import plan_pro

        opts = PlanOptions(layers=layers, include_sliding=include_sliding)
        return plan_pro(pre, pre, opts, fix, ridge, device)
    options = PlanOptions(
        layers=layers,
        include_sliding=include_sliding,
        targets=targets,
        adapter_options=adapter_options or {},
        tensor_pattern=tensor_pattern,
    )
    return build_plan(pre, pre, options)


def run_adapter_job(
    pre_root: str | Path,
    adapter_root: str | Path,
    out: str | Path,
    *,
    method: str = METHOD_RESTORE,
    merge_adapter: bool = False,
    layers: list[int] | None = None,
    include_sliding: bool = False,
    targets: tuple[str, ...] = ("q", "k"),
    fix: str = "key",
    ridge: float = 1.0,
    device: str = "auto",
    adapter_options: dict[str, Any] | None = None,
    tensor_pattern: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    expect_layers: list[int] | None = None,
    pre_source: str | None = None,
    post_source: str | None = None,
    pre_id: str | None = None,
    post_id: str | None = None,
    record_paths: bool = False,
    command: str = "",
    progress: Progress | None = None,
) -> AdapterJobResult:
    """QK-Restore (``method='qk-restore'``) or QK-Pro (``'qk-pro'``) on POST = PRE + adapter."""
    t0 = time.perf_counter()
    out = Path(out)
    pre_source = pre_source or str(pre_root)
    post_source = post_source or str(adapter_root)
    with (
        _labelled("PRE", Checkpoint.open, pre_root) as pre,
        _labelled("POST", open_adapter, adapter_root) as adapter,
    ):
        check_output_location(out.absolute(), {"PRE": pre.root, "POST": adapter.root})
        if not dry_run and out.exists() and not overwrite:
            raise OutputError(f"{out}: already exists", hint="pass --overwrite to replace it")
        if not dry_run and merge_adapter:
            check_free_space(out.absolute().parent, pre.total_bytes)
        notes = [n for n in [base_name_check(adapter.config.base_model, pre_source, pre.root)] if n]
        check_base(adapter, pre.tensors, str(pre.root))
        plan = make_plan(
            pre,
            method=method,
            layers=layers,
            include_sliding=include_sliding,
            targets=targets,
            fix=fix,
            ridge=ridge,
            device=device,
            adapter_options=adapter_options,
            tensor_pattern=tensor_pattern,
        )
        if expect_layers is not None and plan.layers != expect_layers:
            raise PlanError(
                f"expected softmax-attention layers {expect_layers}, but the plan has {plan.layers}"
            )
        aplan = plan_adapter(adapter, plan)
        _check_writable(adapter, aplan, pre, merge_adapter)
        notes += plan.notes
        if not any(a.action != KEEP for a in aplan.actions):
            notes.append("no module of the adapter lies in a planned layer: OUT equals the input")
        # Named by Hub id or folder name only; absolute paths go to the local record (issue 14).
        roots = {"pre": pre.root.resolve(), "post": adapter.root.resolve()}
        ids = {"pre": pre_id, "post": post_id}
        sources: dict[str, Any] = {
            side: {"source": ids[side] or roots[side].name, "hub_id": ids[side]}
            | ({"path": str(roots[side])} if record_paths else {})
            for side in ("pre", "post")
        }
        sources["post"]["adapter"] = True
        result = AdapterJobResult(out, plan, aplan, merge_adapter, dry_run, sources, notes)
        result.local_paths = {side: str(root) for side, root in roots.items()}
        if dry_run:
            result.seconds = time.perf_counter() - t0
            return result
        edits = compute_edits(adapter, aplan, pre)
        with staging_dir(out, overwrite) as tmp:
            if merge_adapter:
                written = write_model(tmp, pre, adapter, aplan, edits, progress)
            else:
                written = write_adapter(tmp, adapter, aplan, edits)
            if edits.solve_stats:
                written["solve"] = edits.solve_stats
            result.written = written
            _card_and_provenance(
                tmp, result, adapter, command if record_paths else redact_command(command)
            )
            write_local_record(tmp, result.local_paths)
        result.seconds = time.perf_counter() - t0
        return result


def write_merged_post(pre_root: str | Path, adapter_root: str | Path, folder: Path) -> Path:
    """POST = PRE + the adapter, every module merged (nothing restored), in PRE's layout.

    What ``sweep`` loads as POST when POST is an adapter: the same merge as ``--merge-adapter``
    with an empty restore plan, so every LoRA module keeps its whole delta.
    """
    with (
        _labelled("PRE", Checkpoint.open, pre_root) as pre,
        _labelled("POST", open_adapter, adapter_root) as adapter,
    ):
        check_base(adapter, pre.tensors, str(pre.root))
        plan = build_plan(pre, pre, PlanOptions(layers=[]))
        aplan = plan_adapter(adapter, plan)
        folder.mkdir(parents=True, exist_ok=True)
        write_model(folder, pre, adapter, aplan, compute_edits(adapter, aplan, pre))
    return folder


def _labelled(label: str, opener: Callable[[Any], Any], path: Any) -> Any:
    """Open an input, naming the side in its error (``PRE: …``), as the checkpoint jobs do."""
    try:
        return opener(path)
    except QKRestoreError as exc:
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


# -- card and provenance --------------------------------------------------------------------------


def _card_and_provenance(
    folder: Path, result: AdapterJobResult, adapter: LoraAdapter, command: str
) -> None:
    plan = result.plan
    old = adapter.root / CARD_NAME
    old_meta, old_body = split_front_matter(
        old.read_text(encoding="utf-8", errors="replace") if old.is_file() else ""
    )
    pre_src = result.sources["pre"]["source"]
    post_src = result.sources["post"]["source"]
    title = "QK-Pro" if plan.method == METHOD_PRO else "QK-Restore"
    meta = {k: v for k, v in old_meta.items() if k not in ("base_model", "library_name", "tags")}
    # peft tags its cards ``base_model:adapter:<base>``, a local path for a local base: drop them
    tags = [
        t
        for t in old_meta.get("tags", []) or []
        if isinstance(t, str) and not t.startswith("base_model:")
    ]
    # The Hub's model tree resolves repo ids only: local folders are named in the text instead.
    ids = [result.sources[s]["hub_id"] for s in ("pre", "post") if result.sources[s]["hub_id"]]
    meta.pop("base_model_relation", None)
    if result.merge_adapter:
        meta |= ({"base_model": ids, "base_model_relation": "merge"} if ids else {}) | {
            "library_name": "transformers"
        }
        own = [plan.method, "merge", "lora"]
    else:
        pre_id = result.sources["pre"]["hub_id"]
        meta |= ({"base_model": pre_id} if pre_id else {}) | {"library_name": "peft"}
        own = [plan.method, "lora", "peft"]
    meta["tags"] = own + [t for t in tags if t not in own]
    rows = "\n".join(
        f"| {a.layer} | `{a.module}` | {a.action} | {a.target} |"
        for a in result.adapter_plan.actions
        if a.action != KEEP
    )
    kind = "a full checkpoint (adapter merged)" if result.merge_adapter else "a PEFT LoRA adapter"
    body = f"""# {title} of the LoRA adapter `{post_src}`

This is {kind} for the base model `{pre_src}`. In the base model's softmax-attention layers
{", ".join(map(str, plan.layers))}, the adapter's changes to the query/key routing were removed
({"QK-Restore" if plan.method == METHOD_RESTORE else "QK-Pro: the free side solved in closed form"}),
so that the merged model routes attention as the base model does there; everything else the adapter
learned is kept. Method: {PAPER}.

| layer | module | action | target |
|---|---|---|---|
{rows}

Made with qkrestore {__version__}:

```bash
{command}
```
"""
    if old_body.strip():
        body += "\n---\n\n## Model card of the input adapter\n\n" + old_body.lstrip()
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    (folder / CARD_NAME).write_text(f"---\n{front}---\n\n{body}", encoding="utf-8")
    record = {
        "tool": "qkrestore",
        "version": __version__,
        "command": command,
        JOB_KEY: {"output_kind": "model" if result.merge_adapter else "adapter"},
        "sources": result.sources,
        "plan": plan.to_json(),
        "adapter_plan": result.adapter_plan.to_json(),
        "written": result.written,
    }
    (folder / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


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
            act = actions[m["module"]]
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
        solved = {a.module for a in plan_adapter(orig, plan).actions if a.action == SOLVE}
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
                else:
                    assert new is not None
                    got = _merged(pre_ck, new, name).to(torch.float32)
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

    if exact:
        ok = torch.equal(got, want)
    else:
        scale = float(want.abs().max()) if want.numel() else 0.0
        ok = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6 * max(scale, 1e-30)))
    if not ok:
        raise VerifyError(f"{out}: tensor '{name}': rows differ from {what}")


__all__ = [
    "AdapterJobResult",
    "inspect_adapter",
    "is_adapter_record",
    "run_adapter_job",
    "verify_adapter_output",
]
