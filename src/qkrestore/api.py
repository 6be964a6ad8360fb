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
from typing import Any, TypedDict

from typing_extensions import Unpack

from .errors import OptionError, PlanError, VerifyError
from .job import Hooks, JobResult, open_side, run_job
from .options import CommandOptions, resolve
from .options import describe as describe_options
from .surgery.inspect import LayerReport, compare, describe
from .surgery.plan import pre_only_tensors
from .surgery.verification import Mismatch, VerifyReport, read_provenance, verify_output

PathLike = str | os.PathLike[str]
Layers = str | int | Sequence[int] | None


class JobArgs(TypedDict, total=False):
    """The keyword options ``merge`` and ``pro`` share (the CLI's flags of the same names).

    For type checkers only: the keywords accepted, their parsing and defaults come from the option
    model (:mod:`qkrestore.options`); ``tests/test_option_model.py`` keeps these keys equal to it.
    """

    layers: Layers
    include_sliding: bool
    allow_arch_mismatch: bool
    carry_missing: bool
    dry_run: bool
    expect_layers: Layers
    overwrite: bool
    link: bool
    jobs: int
    push_to_hub: str | None
    private: bool
    revision: str | None
    pre_id: str | None
    post_id: str | None
    record_paths: bool
    pre_weights: str | None
    post_weights: str | None
    merge_adapter: bool


class MergeArgs(JobArgs, total=False):
    """``merge``'s keyword options: the shared ones and QK-Restore's own."""

    targets: str | Sequence[str]
    tensor_pattern: str | None
    mla_latent: str


class ProArgs(JobArgs, total=False):
    """``pro``'s keyword options: the shared ones and QK-Pro's own."""

    fix: str
    ridge: float
    form: str
    device: str


def _path(path: PathLike | None, name: str = "recipe") -> Path | None:
    return None if path is None else Path(_fspath(path, name))


def _fspath(path: Any, name: str) -> str:
    """``path`` as text, or an OptionError naming the argument (not pathlib's bare TypeError)."""
    if not isinstance(path, (str, os.PathLike)):
        raise OptionError(name, f"{path!r}: give a path (text or a Path)")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise OptionError(name, f"{path!r}: give a path (text or a Path)")
    return text


def _run(
    options: CommandOptions,
    pre: PathLike,
    post: PathLike,
    output: PathLike,
    on_note: Callable[[str], None] | None,
) -> JobResult:
    # Recorded like a command line (absolute paths are shortened the same way).
    paths = [os.fspath(p) for p in (pre, post, output)]
    command = shlex.join([f"qkrestore.{options.command}", *paths])
    hooks = Hooks(note=on_note or (lambda message: None), command=command)
    return run_job(paths[0], paths[1], options.method(), options.job, hooks)


def merge(
    pre: PathLike,
    post: PathLike,
    output: PathLike,
    *,
    recipe: PathLike | None = None,
    on_note: Callable[[str], None] | None = None,
    **options: Unpack[MergeArgs],
) -> JobResult:
    """QK-Restore: write ``output`` = POST with the routing rows of the planned layers from PRE.

    The keyword options are the ``merge`` command's, by the names below (``layers="auto"`` or
    ``None`` means every global softmax layer; lists may be given as lists or comma text).
    ``recipe`` is a YAML recipe (``merge --config``); keywords override its keys. ``on_note``
    receives the notes the CLI would print; they are also in ``result.notes``. PRE and POST may be
    folders or Hub ids (``org/name[@rev]``).

    Options:
    """
    pre, post, output = (
        _fspath(p, n) for p, n in ((pre, "pre"), (post, "post"), (output, "output"))
    )
    chosen = resolve("merge", output, options, recipe=_path(recipe))
    return _run(chosen, pre, post, output, on_note)


def pro(
    pre: PathLike,
    post: PathLike,
    output: PathLike,
    *,
    recipe: PathLike | None = None,
    on_note: Callable[[str], None] | None = None,
    **options: Unpack[ProArgs],
) -> JobResult:
    """QK-Pro: hold ``fix`` (``"key"`` or ``"query"``) at PRE and solve the other side per head.

    ``ridge`` ≥ 0 relaxes the constraint (0 is QK-Restore); ``form="cross-gram"`` keeps PRE's
    per-head cross-Gram exactly instead; ``device`` is ``auto``, ``cpu`` or ``cuda``. Solve
    figures are in ``result.summary["solve"]``. ``recipe`` and ``on_note`` as for :func:`merge`.

    Options:
    """
    pre, post, output = (
        _fspath(p, n) for p, n in ((pre, "pre"), (post, "post"), (output, "output"))
    )
    chosen = resolve("pro", output, options, recipe=_path(recipe))
    return _run(chosen, pre, post, output, on_note)


# The options' names, defaults and help, from the model (``help(qkrestore.merge)`` lists them).
merge.__doc__ = f"{merge.__doc__}\n{describe_options('merge')}\n"
pro.__doc__ = f"{pro.__doc__}\n{describe_options('pro')}\n"


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
    from .adapter import is_adapter_record, verify_adapter_output

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
    with open_side(os.fspath(model), "MODEL", weights=weights) as ck:
        report = describe(ck)
        if compare_with is not None:
            with open_side(os.fspath(compare_with), "OTHER") as other:
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
    "MergeArgs",
    "ProArgs",
    "VerifyReport",
    "inspect_layers",
    "merge",
    "pro",
    "verify",
]
