"""The Python API: the CLI's jobs as functions that return typed results and raise typed errors.

    import qkrestore

    result = qkrestore.merge("./base", "./sft", "./sft-qkrestore")
    print(result.plan.layers, result.summary["tensor_sha256"])
    report = qkrestore.verify("./sft-qkrestore")
    assert report.ok

Each function builds the same option objects the CLI builds and calls the same pipeline
(:func:`qkrestore.job.run_job`), so a result's ``to_json()`` is the document ``--json`` prints.
Every problem with the inputs or options is a :class:`~qkrestore.errors.QKRestoreError` subclass;
nothing here exits the process or prints.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

from typing_extensions import Unpack

from .adapters.shared import MLA_LATENT
from .errors import PlanError, VerifyError
from .inspect import LayerReport, compare, describe
from .job import Hooks, JobOptions, JobResult, open_side, run_job
from .methods import Method, QKRestore
from .plan import PlanOptions, parse_layers, parse_targets, pre_only_tensors
from .verification import Mismatch, VerifyReport, read_provenance, verify_output
from .writer import WriteOptions

PathLike = str | os.PathLike[str]
Layers = str | Sequence[int] | None


class JobArgs(TypedDict, total=False):
    """The keyword options ``merge`` and ``pro`` share (the CLI's flags of the same names)."""

    dry_run: bool
    overwrite: bool
    link: bool
    jobs: int
    expect_layers: Layers
    push_to_hub: str | None
    private: bool
    revision: str | None
    pre_id: str | None
    post_id: str | None
    record_paths: bool
    pre_weights: str | None
    post_weights: str | None
    merge_adapter: bool
    on_note: Callable[[str], None] | None


def _layers(layers: Layers) -> list[int] | None:
    """``None``/``"auto"`` → every global layer; a string like ``"3,7-9"``; or a list of ints."""
    if layers is None:
        return None
    if isinstance(layers, str):
        return parse_layers(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise PlanError(f"layers {list(layers)!r}: give 0-based layer indices")
    return sorted(set(layers))


def _targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(parse_targets(targets if isinstance(targets, str) else ",".join(targets)))


def _run(
    method: Method, pre: PathLike, post: PathLike, output: PathLike, call: str, job: JobArgs
) -> JobResult:
    unknown = set(job) - set(JobArgs.__annotations__)
    if unknown:
        raise PlanError(f"{call}(): unknown option(s) {', '.join(sorted(unknown))}")
    jobs = job.get("jobs", 2)
    if jobs < 1:
        raise PlanError(f"jobs={jobs}: must be at least 1")
    options = JobOptions(
        output=Path(output),
        dry_run=job.get("dry_run", False),
        expect_layers=_layers(job.get("expect_layers")),
        write=WriteOptions(
            overwrite=job.get("overwrite", False), link=job.get("link", False), jobs=jobs
        ),
        push_to_hub=job.get("push_to_hub"),
        private=job.get("private", False),
        revision=job.get("revision"),
        pre_id=job.get("pre_id"),
        post_id=job.get("post_id"),
        record_paths=job.get("record_paths", False),
        pre_weights=job.get("pre_weights"),
        post_weights=job.get("post_weights"),
        merge_adapter=job.get("merge_adapter", False),
    )
    # Recorded like a command line (absolute paths are shortened the same way).
    command = shlex.join([f"qkrestore.{call}", *map(os.fspath, (pre, post, output))])
    hooks = Hooks(note=job.get("on_note") or (lambda message: None), command=command)
    return run_job(os.fspath(pre), os.fspath(post), method, options, hooks)


def merge(
    pre: PathLike,
    post: PathLike,
    output: PathLike,
    *,
    layers: Layers = None,
    include_sliding: bool = False,
    targets: str | Sequence[str] = ("q", "k"),
    allow_arch_mismatch: bool = False,
    tensor_pattern: str | None = None,
    mla_latent: str = "post",
    carry_missing: bool = False,
    **job: Unpack[JobArgs],
) -> JobResult:
    """QK-Restore: write ``output`` = POST with the routing rows of the planned layers from PRE.

    The keyword options are the ``merge`` command's (``layers="auto"`` or ``None`` means every
    global softmax layer), plus :class:`JobArgs`. ``on_note`` receives the notes the CLI would
    print; they are also in ``result.notes``. PRE and POST may be folders or Hub ids
    (``org/name[@rev]``).
    """
    if mla_latent not in ("pre", "post"):
        raise PlanError(f"mla_latent={mla_latent!r}: use 'pre' or 'post'")
    method = QKRestore(
        PlanOptions(
            layers=_layers(layers),
            include_sliding=include_sliding,
            targets=_targets(targets),
            allow_arch_mismatch=allow_arch_mismatch,
            tensor_pattern=tensor_pattern,
            adapter_options={MLA_LATENT: "pre"} if mla_latent == "pre" else {},
            carry_missing=carry_missing,
        )
    )
    return _run(method, pre, post, output, "merge", job)


def pro(
    pre: PathLike,
    post: PathLike,
    output: PathLike,
    *,
    fix: str = "key",
    ridge: float = 1.0,
    device: str = "auto",
    form: str = "ridge",
    layers: Layers = None,
    include_sliding: bool = False,
    allow_arch_mismatch: bool = False,
    carry_missing: bool = False,
    **job: Unpack[JobArgs],
) -> JobResult:
    """QK-Pro: hold ``fix`` (``"key"`` or ``"query"``) at PRE and solve the other side per head.

    ``ridge`` ≥ 0 relaxes the constraint (0 is QK-Restore); ``form="cross-gram"`` keeps PRE's
    per-head cross-Gram exactly instead; ``device`` is ``auto``, ``cpu`` or ``cuda``. Solve figures are in ``result.summary["solve"]``.
    """
    from .qkpro import QKPro  # torch is imported only by the jobs that compute

    method = QKPro(
        PlanOptions(
            layers=_layers(layers),
            include_sliding=include_sliding,
            allow_arch_mismatch=allow_arch_mismatch,
            carry_missing=carry_missing,
        ),
        fix=fix,
        ridge=ridge,
        device=device,
        form=form,
    )
    return _run(method, pre, post, output, "pro", job)


def verify(
    output: PathLike,
    *,
    pre: PathLike | None = None,
    post: PathLike | None = None,
    forward: str = "auto",
    pre_weights: str | None = None,
) -> VerifyReport:
    """Re-check ``output`` against its recorded plan; ``report.ok`` says whether it matches.

    A mismatch is a result (``report.mismatches``), not an exception; an unreadable output or
    source is a ``QKRestoreError``. ``forward`` is ``auto``, ``always`` or ``never``.
    """
    if forward not in ("auto", "always", "never"):
        raise PlanError(f"forward={forward!r}: use 'auto', 'always' or 'never'")
    from .lora import is_adapter_record, verify_adapter_output

    out = Path(output)
    record = read_provenance(out)
    if is_adapter_record(record):  # made from a PEFT adapter: checked merged with PRE
        pre_path, post_path = (None if p is None else Path(p) for p in (pre, post))
        report = VerifyReport(out=str(out), pre=str(pre_path or ""), post=str(post_path or ""))
        try:
            doc = verify_adapter_output(out, record, pre_path, post_path)
            report.tensors_checked = int(doc["tensors_checked"])
        except VerifyError as exc:
            report.mismatches.append(Mismatch(str(out), None, exc.message))
        return report
    return verify_output(
        Path(output),
        None if pre is None else Path(pre),
        None if post is None else Path(post),
        forward,
        pre_weights=pre_weights,
    )


def inspect_layers(
    model: PathLike, *, compare_with: PathLike | None = None, weights: str | None = None
) -> LayerReport:
    """Which layers of ``model`` are softmax attention and where their Q/K tensors are.

    With ``compare_with``, ``report.compare`` holds the relative Q/K drift per layer.
    """
    with open_side(model, "MODEL", weights=weights) as ck:
        report = describe(ck)
        if compare_with is not None:
            with open_side(compare_with, "OTHER") as other:
                report.compare = {
                    "other": os.fspath(compare_with),
                    "layers": compare(ck, other, report),
                    # e.g. mtp.* heads or a vision tower that one side's save dropped
                    "only_in_model": list(pre_only_tensors(ck.tensors, other.tensors)),
                    "only_in_other": list(pre_only_tensors(other.tensors, ck.tensors)),
                }
    return report


__all__ = [
    "JobArgs",
    "JobResult",
    "LayerReport",
    "VerifyReport",
    "inspect_layers",
    "merge",
    "pro",
    "verify",
]
