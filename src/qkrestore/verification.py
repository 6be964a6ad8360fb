"""Re-check an output against its recorded plan, byte for byte.

OUT's shards must have POST's headers exactly (so offsets agree), every byte outside the planned rows
must equal POST's, every planned row must equal PRE's (cast to POST's dtype where the plan says so),
computed rows (QK-Pro) must hash as recorded, and every other file must equal POST's. Where
transformers knows the model, a forward pass shows it also loads and runs.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import CARD_NAME, PROVENANCE_NAME, recorded_source_paths
from .carried import carried_index
from .checkpoint import CHUNK, INDEX_NAME, Checkpoint, read_header_bytes
from .dtypes import ITEMSIZE, convert
from .errors import CheckpointError, QKRestoreError
from .plan import CarriedTensor, RestorePlan, TensorPatch, patch_ranges

FORWARD_AUTO_MAX_BYTES = 2 * 1024**3
MAX_REPORTED = 10


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
    path = out / PROVENANCE_NAME
    if not path.is_file():
        raise QKRestoreError(f"{path}: missing; was {out} written by qkrestore merge or pro?")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        RestorePlan.from_json(record["plan"])
    except (ValueError, KeyError, TypeError) as exc:
        raise QKRestoreError(f"{path}: not a valid qkrestore provenance record ({exc})") from None
    return record


def verify_output(
    out: Path,
    pre_path: Path | None = None,
    post_path: Path | None = None,
    forward: str = "auto",
) -> VerifyReport:
    out = Path(out)
    record = read_provenance(out)
    plan = RestorePlan.from_json(record["plan"])
    recorded = recorded_source_paths(out, record)
    pre_root, post_root = pre_path or recorded["pre"], post_path or recorded["post"]
    if pre_root is None or post_root is None:
        missing = " and ".join(
            s for s, p in (("--pre", pre_root), ("--post", post_root)) if p is None
        )
        raise QKRestoreError(
            f"{out}: OUT does not record where its sources are on this machine",
            hint=f"pass {missing} (the folders it was made from)",
        )
    pre_root, post_root = Path(pre_root), Path(post_root)
    report = VerifyReport(out=str(out), pre=str(pre_root), post=str(post_root))
    with (
        Checkpoint.open(out) as got,
        Checkpoint.open(pre_root, partial=True) as pre,  # Hub PRE holds only the needed shards
        Checkpoint.open(post_root) as post,
    ):
        _check_files(report, record, out, post, plan, pre)
        _check_tensors(report, record, plan, got, pre, post)
        if forward != "never" and not report.mismatches:
            report.forward = forward_pass(out, got, forward)
    return report


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
        step = CHUNK - CHUNK % (ITEMSIZE[src.dtype] * ITEMSIZE[patch.dtype])
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


def forward_pass(out: Path, got: Checkpoint, mode: str) -> dict[str, Any]:
    """Load OUT with transformers and run one short forward pass, where transformers knows it."""
    if mode == "auto" and got.total_bytes > FORWARD_AUTO_MAX_BYTES:
        return {
            "ran": False,
            "ok": True,
            "message": f"skipped: {got.total_bytes / 2**30:.1f} GiB is above the automatic limit "
            "(pass --forward to force)",
        }
    import torch

    from .runtime import has_causal_lm_class, load_causal_lm

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
        vocab = int(getattr(config.get_text_config(), "vocab_size", 16) or 16)
        ids = torch.arange(8).remainder(vocab).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        finite = bool(torch.isfinite(logits).all())
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return {"ran": True, "ok": False, "message": f"failed to load or run: {message}"}
    return {
        "ran": True,
        "ok": finite,
        "message": f"loaded {type(model).__name__}; logits {list(logits.shape)} "
        + ("all finite" if finite else "contain NaN/inf"),
    }


__all__ = ["CheckpointError", "VerifyReport", "forward_pass", "verify_output"]
