"""Re-check an output against its recorded plan, byte for byte.

OUT's shards must have POST's headers exactly (so offsets agree), every byte outside the planned rows
must equal POST's, every planned row must equal PRE's (cast to POST's dtype where the plan says so),
computed rows (QK-Pro) must hash as recorded, and every other file must equal POST's.

Files are not the model, though: the model is what the loader makes of them. So OUT must hold one
weight set only, the one transformers reads (a stale ``model.safetensors`` beside restored shards
would be loaded instead of them), and, where transformers knows the family, OUT is loaded and every
planned routing parameter, as the loaded module holds it, is compared with the plan's source, and a
sample of the other parameters with POST's; then one forward pass shows it runs.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, QKRestoreError
from ..io.checkpoint import CHUNK, INDEX_NAME, Checkpoint, read_header_bytes
from ..io.dtypes import BITSIZE, cast_chunk, convert, to_tensor
from ..io.weightfiles import (
    entries_present,
    is_entry_name,
    is_weight_file,
    loader_view,
    variant_entries,
)
from .card import CARD_NAME, PROVENANCE_NAME, source_paths
from .carried import carried_index
from .plan import CarriedTensor, RestorePlan, TensorPatch, patch_ranges

FORWARD_AUTO_MAX_BYTES = 2 * 1024**3
MAX_REPORTED = 10
LOADED_SAMPLE = 8  # parameters outside the plan compared in the loaded model


@dataclass
class Mismatch:
    file: str
    tensor: str | None
    reason: str

    def __str__(self) -> str:
        what = f"tensor '{self.tensor}'" if self.tensor else "file"
        return f"{self.file}: {what}: {self.reason}"


@dataclass
class VerifyReport:
    out: str
    pre: str
    post: str
    tensors_checked: int = 0
    files_checked: int = 0
    bytes_checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    forward: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.mismatches and (self.forward is None or self.forward.get("ok", True))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "out": self.out,
            "pre": self.pre,
            "post": self.post,
            "tensors_checked": self.tensors_checked,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "mismatches": [
                {"file": m.file, "tensor": m.tensor, "reason": m.reason} for m in self.mismatches
            ],
            "forward": self.forward,
        }


def read_provenance(out: Path) -> dict[str, Any]:
    """OUT's provenance record, checked field by field before anything acts on it.

    The record is a file in a folder that may come from anywhere: a field with an unexpected
    value is refused in one line naming the field, never left to fail deep inside ``verify``.
    """
    path = out / PROVENANCE_NAME
    if not path.is_file():
        raise QKRestoreError(f"{path}: missing; was {out} written by qkrestore merge or pro?")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise QKRestoreError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    validate_record(record, path)
    return record


class _Bad(Exception):
    """A provenance field with an unexpected value: (field, what was expected)."""


def _want(ok: bool, field: str, expected: str) -> None:
    if not ok:
        raise _Bad(field, expected)


def _strs(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _rel_path(value: Any) -> bool:
    """A relative path inside OUT (a record naming ``../x`` or ``/etc/x`` is not OUT's)."""
    return (
        isinstance(value, str)
        and bool(value)
        and not value.startswith(("/", "\\"))
        and ".." not in value.replace("\\", "/").split("/")
    )


def validate_record(record: Any, path: Path) -> None:
    """Raise :class:`QKRestoreError` naming the first field of ``record`` with a value ``verify``
    cannot use (a wrong type, an unknown output kind, a row range out of order, ...)."""
    try:
        _check_record(record)
    except _Bad as bad:
        field, expected = bad.args
        value = _field(record, field)
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise QKRestoreError(
            f"{path}: field '{field}' is {shown}, expected {expected}",
            hint="the provenance record was edited or damaged; write OUT again to re-check it",
        ) from None


def _field(record: Any, field: str) -> Any:
    value = record
    for part in field.replace("]", "").replace("[", ".").split("."):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return value


def _check_record(record: Any) -> None:
    _want(isinstance(record, dict), "(record)", "a JSON object")
    _want(record.get("tool") in (None, "qkrestore"), "tool", "'qkrestore'")
    for key in ("version", "command"):
        _want(isinstance(record.get(key, ""), str), key, "a string")
    sources = record.get("sources", {})
    _want(isinstance(sources, dict), "sources", "an object")
    for side in ("pre", "post"):
        src = sources.get(side, {})
        _want(isinstance(src, dict), f"sources.{side}", "an object")
        for key in ("source", "path"):
            _want(isinstance(src.get(key, ""), str), f"sources.{side}.{key}", "a string")
        hub = src.get("hub_id")
        _want(hub is None or isinstance(hub, str), f"sources.{side}.hub_id", "a string or null")
    for key in ("files", "skipped_files", "linked_files"):
        value = record.get(key, [])
        _want(_strs(value), key, "a list of file names")
        for i, name in enumerate(value):
            _want(_rel_path(name), f"{key}[{i}]", "a relative path inside OUT")
    sha = record.get("tensor_sha256", {})
    _want(
        isinstance(sha, dict)
        and all(
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)
            for v in sha.values()
        ),
        "tensor_sha256",
        "an object of sha256 hex digests",
    )
    if "adapter_job" in record:
        job = record["adapter_job"]
        _want(isinstance(job, dict), "adapter_job", "an object")
        _want(
            job.get("output_kind") in ("adapter", "model"),
            "adapter_job.output_kind",
            "'adapter' or 'model'",
        )
    _want("plan" in record, "plan", "the restore plan")
    plan = record["plan"]
    _want(isinstance(plan, dict), "plan", "an object")
    _want(isinstance(plan.get("tensors"), list), "plan.tensors", "a list")
    layers = plan.get("layers")
    _want(isinstance(layers, list) and all(_nat(i) for i in layers), "plan.layers", "layer numbers")
    for i, p in enumerate(plan["tensors"]):
        where = f"plan.tensors[{i}]"
        _want(isinstance(p, dict), where, "an object")
        for key in ("name", "file", "dtype", "target", "role"):
            _want(isinstance(p.get(key), str), f"{where}.{key}", "a string")
        _want(_rel_path(p["file"]), f"{where}.file", "a relative path inside OUT")
        _want(p["dtype"] in BITSIZE, f"{where}.dtype", "a safetensors dtype")
        _want(
            p.get("pre_dtype") in (None, "", *BITSIZE), f"{where}.pre_dtype", "a safetensors dtype"
        )
        _want(
            p.get("source", "pre") in ("pre", "computed"), f"{where}.source", "'pre' or 'computed'"
        )
        shape = p.get("shape")
        _want(
            isinstance(shape, list) and all(_nat(x) for x in shape),
            f"{where}.shape",
            "a list of sizes",
        )
        rows = p.get("rows")
        _want(isinstance(rows, list) and bool(rows), f"{where}.rows", "a list of row ranges")
        end = 0
        for a_b in rows:
            ok = isinstance(a_b, list) and len(a_b) == 2 and all(_nat(x) for x in a_b)
            ok = ok and end <= a_b[0] < a_b[1] <= (shape[0] if shape else 1)
            _want(ok, f"{where}.rows", "ascending [start, end) ranges within the tensor")
            end = a_b[1]
    try:
        RestorePlan.from_json(plan)
    except (ValueError, KeyError, TypeError) as exc:
        raise _Bad("plan", f"a restore plan ({exc})") from None


def _nat(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def verify_output(
    out: Path,
    pre_path: Path | None = None,
    post_path: Path | None = None,
    forward: str = "auto",
    *,
    pre_weights: str | None = None,
) -> VerifyReport:
    """Check OUT against its plan; ``pre_weights`` names PRE's weight set where it holds two."""
    out = Path(out)
    record = read_provenance(out)
    plan = RestorePlan.from_json(record["plan"])
    pre_root, post_root = source_paths(out, record, pre_path, post_path)
    report = VerifyReport(out=str(out), pre=str(pre_root), post=str(post_root))
    entry = restored_entry(out, record)
    _check_weight_sets(report, out, entry)
    post_weights = entry if entry and (post_root / entry).is_file() else None
    with (
        Checkpoint.open(out, weights=entry) as got,
        # Hub PRE holds only the needed shards
        Checkpoint.open(pre_root, partial=True, weights=pre_weights) as pre,
        Checkpoint.open(post_root, weights=post_weights) as post,
    ):
        _check_files(report, record, out, post, plan, pre)
        _check_tensors(report, record, plan, got, pre, post)
        if forward != "never" and not report.mismatches:

            def inspect(model: Any) -> dict[str, Any]:
                found, summary = check_loaded(model, plan, got, pre, post)
                for m in found:
                    _add(report, m)
                return summary

            report.forward = forward_pass(out, got, forward, inspect)
    return report


# -- the weight set OUT holds ----------------------------------------------------------------------


def restored_entry(out: Path, record: dict[str, Any]) -> str | None:
    """The weight-set entry OUT was written with (``model.safetensors`` or an index), if recorded."""
    files = [f for f in record.get("files", []) if "/" not in f and is_entry_name(f)]
    indexes = [f for f in files if f.endswith(".json")]
    if indexes:
        return indexes[0] if len(indexes) == 1 else None
    return files[0] if len(files) == 1 else None


def _check_weight_sets(report: VerifyReport, out: Path, entry: str | None) -> None:
    """OUT must hold one weight set, the restored one, and it must be the one the loader reads.

    Checked from the folder listing alone, so it holds with ``--forward never`` too: a second set
    (a stale single file beside restored shards, a variant, a stray shard) is what a loader may read
    instead of the restored weights, or as well as them (vLLM globs ``*.safetensors`` where there
    is no index).
    """
    if entry is None:
        return
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # Checkpoint.open reports it in its own words
    view = loader_view(out, config if isinstance(config, dict) else {})
    if view is not None and view.entry != entry:
        _add(
            report,
            Mismatch(
                view.entry,
                None,
                f"transformers loads this file ({view.reason}), not the restored {entry}",
            ),
        )
    restored: set[str] = {entry}
    if entry.endswith(".json"):
        try:
            index = json.loads((out / entry).read_text(encoding="utf-8"))
            restored |= set(index.get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError):
            return
    others = set(entries_present(out, config)) | set(variant_entries(out))
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if path.is_file() and (is_weight_file(rel) or rel in others) and rel not in restored:
            if view is not None and rel == view.entry and view.entry != entry:
                continue  # already reported
            _add(report, Mismatch(rel, None, f"a weight file outside the restored set ({entry})"))


# -- the model as transformers loads it ----------------------------------------------------------


def expected_bytes(patch: TensorPatch, got: Checkpoint, pre: Checkpoint, post: Checkpoint) -> bytes:
    """A planned tensor as the plan says it must be: POST's bytes with PRE's rows put in.

    Computed tensors (QK-Pro) are OUT's own bytes, which :func:`_check_patch` has already held
    against the sha256 recorded when they were written.
    """
    if patch.source != "pre":
        return got.read(patch.name)
    info = post.tensors[patch.name]
    data = bytearray(post.read(patch.name))
    for dst_off, dst_len, src_off, src_len in patch_ranges(patch, pre, post):
        src = pre.pread(pre.tensors[patch.pre_name].file, src_off, src_len)
        piece = convert(src, patch.pre_dtype, patch.dtype) if patch.cast else src
        assert len(piece) == dst_len
        data[dst_off - info.start : dst_off - info.start + dst_len] = piece
    return bytes(data)


def _loaded_key(name: str, state: dict[str, Any]) -> str | None:
    """The loaded model's name for a checkpoint tensor (the same, or one differing by a prefix)."""
    if name in state:
        return name
    hits = [k for k in state if k.endswith("." + name) or name.endswith("." + k)]
    return hits[0] if len(hits) == 1 else None


def _holds(param: Any, data: bytes, dtype: str, shape: tuple[int, ...]) -> bool | None:
    """Whether a loaded parameter holds these values (``None``: not comparable, e.g. reshaped)."""
    import torch

    if tuple(param.shape) != tuple(shape):
        return None
    want = to_tensor(data, dtype, shape)
    have = param.detach().to("cpu")
    if have.dtype == want.dtype:
        a = have.contiguous().reshape(-1).view(torch.uint8)
        b = want.contiguous().reshape(-1).view(torch.uint8)
        return torch.equal(a, b)
    return torch.equal(have, want.to(have.dtype))


def check_loaded(
    model: Any, plan: RestorePlan, got: Checkpoint, pre: Checkpoint, post: Checkpoint
) -> tuple[list[Mismatch], dict[str, Any]]:
    """Compare a loaded model's parameters with the plan's sources.

    Every planned tensor must hold the plan's values (PRE's rows, cast where planned; computed rows
    as recorded) and a sample of the others POST's. A parameter transformers renames or reshapes
    beyond a prefix is counted as not compared, not as a failure.
    """
    state = model.state_dict()
    found: list[Mismatch] = []
    planned = plan.by_name()
    routing = others = 0
    not_compared: list[str] = []
    for name, patch in planned.items():
        key = _loaded_key(name, state)
        if key is None:
            not_compared.append(name)
            continue
        info = post.tensors[name]
        same = _holds(state[key], expected_bytes(patch, got, pre, post), info.dtype, info.shape)
        if same is None:
            not_compared.append(name)
        elif not same:
            found.append(
                Mismatch(
                    patch.file,
                    name,
                    "the loaded model holds other values than the plan's source (the loader read "
                    "other weights than the restored ones)",
                )
            )
        else:
            routing += 1
    rest = sorted(n for n in post.tensors if n not in planned and _loaded_key(n, state))
    for name in rest[:: max(1, len(rest) // LOADED_SAMPLE)][:LOADED_SAMPLE]:
        info = post.tensors[name]
        key = _loaded_key(name, state)
        assert key is not None
        same = _holds(state[key], post.read(name), info.dtype, info.shape)
        if same is False:
            found.append(
                Mismatch(info.file, name, "the loaded model holds other values than POST's")
            )
        elif same:
            others += 1
    return found, {
        "ok": not found,
        "planned_compared": routing,
        "others_compared": others,
        "not_compared": not_compared,
    }


def _add(report: VerifyReport, mismatch: Mismatch) -> None:
    if len(report.mismatches) < MAX_REPORTED:
        report.mismatches.append(mismatch)


def _check_files(
    report: VerifyReport,
    record: dict[str, Any],
    out: Path,
    post: Checkpoint,
    plan: RestorePlan,
    pre: Checkpoint,
) -> None:
    for rel in record.get("files", []):
        if rel in post.shards or rel == CARD_NAME:
            continue
        report.files_checked += 1
        a, b = out / rel, post.root / rel
        if not a.is_file():
            _add(report, Mismatch(rel, None, "missing from OUT"))
        elif rel == INDEX_NAME and plan.carried and b.is_file():
            # POST's index with the carried tensors added, and nothing else changed
            if a.read_bytes() != carried_index(b.read_bytes(), plan, pre):
                _add(report, Mismatch(rel, None, "differs from POST's plus the carried tensors"))
        elif not b.is_file() or _sha256(a) != _sha256(b):
            _add(report, Mismatch(rel, None, "differs from POST's"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_tensors(
    report: VerifyReport,
    record: dict[str, Any],
    plan: RestorePlan,
    got: Checkpoint,
    pre: Checkpoint,
    post: Checkpoint,
) -> None:
    expected = set(post.tensors) | {c.name for c in plan.carried}
    if set(got.tensors) != expected:
        extra = sorted(set(got.tensors) ^ expected)
        _add(report, Mismatch("*", extra[0], "tensor set differs from POST's"))
        return
    for p in plan.patches:  # an edited record may name tensors the checkpoints do not hold
        side = (
            "POST" if p.name not in post.tensors else "PRE" if p.pre_name not in pre.tensors else ""
        )
        if side:
            name = p.name if side == "POST" else p.pre_name
            _add(report, Mismatch(p.file, name, f"the plan restores a tensor {side} does not hold"))
            return
    recorded = record.get("tensor_sha256", {})
    patches = plan.by_name()
    for rel, shard in post.shards.items():
        if rel not in got.shards or read_header_bytes(got.shards[rel].path) != read_header_bytes(
            shard.path
        ):
            _add(report, Mismatch(rel, None, "safetensors header differs from POST's"))
            continue
        # Offsets agree with POST's, so compare POST's bytes everywhere except the planned rows.
        planned: list[tuple[int, int]] = []
        for patch in (p for p in plan.patches if p.file == rel):
            planned += [(off, off + n) for off, n, _, _ in patch_ranges(patch, pre, post)]
        starts = [post.tensors[n].start for n in shard.tensors]
        cursor = shard.data_start
        for a, b in [*sorted(planned), (shard.size, shard.size)]:
            _compare(report, got, post, rel, cursor, a - cursor, shard.tensors, starts)
            cursor = b
        report.tensors_checked += len(shard.tensors)
    for name, patch in patches.items():
        _check_patch(report, got, pre, post, patch, recorded.get(name))
    for c in plan.carried:
        _check_carried(report, got, pre, c, recorded.get(c.name))


def _check_carried(
    report: VerifyReport, got: Checkpoint, pre: Checkpoint, c: CarriedTensor, sha: str | None
) -> None:
    """A tensor carried from PRE: PRE's bytes exactly, with PRE's dtype and shape, as recorded."""
    info, src = got.tensors[c.name], pre.tensors.get(c.pre_name)
    if src is None:
        _add(report, Mismatch(info.file, c.name, f"PRE has no tensor '{c.pre_name}' to compare"))
        return
    if (info.dtype, info.shape) != (src.dtype, src.shape):
        _add(report, Mismatch(info.file, c.name, "dtype or shape differs from PRE's"))
        return
    digest = hashlib.sha256()
    pieces = zip(
        got.iter_chunks(info.file, info.start, info.nbytes, CHUNK),
        pre.iter_chunks(src.file, src.start, src.nbytes, CHUNK),
    )
    for a, b in pieces:
        report.bytes_checked += len(a)
        digest.update(a)
        if a != b:
            _add(report, Mismatch(info.file, c.name, "carried tensor differs from PRE's"))
            return
    if sha is not None and digest.hexdigest() != sha:
        _add(report, Mismatch(info.file, c.name, "sha256 differs from the recorded one"))
    report.tensors_checked += 1


def _compare(
    report: VerifyReport,
    got: Checkpoint,
    post: Checkpoint,
    rel: str,
    offset: int,
    length: int,
    names: tuple[str, ...],
    starts: list[int],
) -> None:
    pos = offset
    for a, b in zip(
        got.iter_chunks(rel, offset, length, CHUNK), post.iter_chunks(rel, offset, length, CHUNK)
    ):
        report.bytes_checked += len(a)
        if a != b:
            first = pos + next(i for i in range(len(a)) if a[i] != b[i])
            idx = bisect.bisect_right(starts, first) - 1
            _add(report, Mismatch(rel, names[idx] if idx >= 0 else None, "differs from POST's"))
            return
        pos += len(a)


def _check_patch(
    report: VerifyReport,
    got: Checkpoint,
    pre: Checkpoint,
    post: Checkpoint,
    patch: TensorPatch,
    recorded_sha: str | None,
) -> None:
    info = got.tensors.get(patch.name)
    if info is None:
        return
    if patch.source == "pre":
        src = pre.tensors.get(patch.pre_name)
        if src is None or src.shape != info.shape:
            _add(report, Mismatch(patch.file, patch.name, "PRE no longer holds this tensor"))
            return
        step = cast_chunk(CHUNK, src.dtype, patch.dtype) if patch.cast else CHUNK
        for dst_off, _, src_off, src_len in patch_ranges(patch, pre, post):
            pos = dst_off
            for piece in pre.iter_chunks(src.file, src_off, src_len, step):
                want = convert(piece, patch.pre_dtype, patch.dtype) if patch.cast else piece
                have = got.pread(patch.file, pos, len(want))
                report.bytes_checked += len(have)
                if have != want:
                    _add(report, Mismatch(patch.file, patch.name, "planned rows differ from PRE's"))
                    return
                pos += len(want)
    if recorded_sha is not None:
        h = hashlib.sha256()
        for piece in got.iter_chunks(patch.file, info.start, info.nbytes, CHUNK):
            h.update(piece)
        if h.hexdigest() != recorded_sha:
            _add(
                report,
                Mismatch(patch.file, patch.name, "sha256 differs from the provenance record"),
            )
    elif patch.source == "computed":
        _add(report, Mismatch(patch.file, patch.name, "computed tensor has no recorded sha256"))


def forward_pass(
    out: Path,
    got: Checkpoint,
    mode: str,
    inspect: Callable[[Any], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Load OUT with transformers and run one short forward pass, where transformers knows it.

    ``inspect`` sees the loaded model first (the parameter comparison); its summary is returned
    under ``"loaded"`` and its ``ok`` counts.
    """
    if mode == "auto" and got.total_bytes > FORWARD_AUTO_MAX_BYTES:
        return {
            "ran": False,
            "ok": True,
            "message": f"skipped: {got.total_bytes / 2**30:.1f} GiB is above the automatic limit "
            "(pass --forward to force)",
        }
    import torch

    from ..io.runtime import has_causal_lm_class, load_causal_lm

    model_type = got.config.get("model_type")
    if not has_causal_lm_class(model_type):
        return {
            "ran": False,
            "ok": True,
            "message": f"skipped: transformers has no causal-LM class for '{model_type}'",
        }
    try:
        model = load_causal_lm(out)
        config = model.config
        loaded = inspect(model) if inspect is not None else None
        vocab = int(getattr(config.get_text_config(), "vocab_size", 16) or 16)
        ids = torch.arange(8).remainder(vocab).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        finite = bool(torch.isfinite(logits).all())
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"ran": True, "ok": False, "message": f"failed to load or run: {message}"}
    result: dict[str, Any] = {
        "ran": True,
        "ok": finite,
        "message": f"loaded {type(model).__name__}; logits {list(logits.shape)} "
        + ("all finite" if finite else "contain NaN/inf"),
    }
    if loaded is not None:
        result["loaded"] = loaded
        result["ok"] = finite and loaded["ok"]
        result["message"] += (
            f"; {loaded['planned_compared']} planned and {loaded['others_compared']} other "
            "parameters as loaded match the plan"
            if loaded["ok"]
            else "; the loaded parameters differ from the plan"
        )
    return result


__all__ = ["CheckpointError", "VerifyReport", "forward_pass", "verify_output"]
