"""Execute a plan: POST's files, with the planned byte ranges taken from PRE, written atomically.

POST's layout is the output layout. Every file of POST is copied by the kernel (``copy_file_range``;
nothing passes through Python) or hard-linked; then, in the shards the plan touches, only the planned
rows are overwritten with ``pwrite`` from bytes read with ``pread`` out of PRE. Header bytes, tensor
order, offsets and metadata are therefore POST's by construction, and memory stays bounded by one
chunk whatever the model size.

Everything is written into a hidden temporary sibling of OUT that is renamed onto OUT only once it is
complete and re-checked; any failure or interruption removes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from .card import PROVENANCE_NAME
from .checkpoint import CHUNK, Checkpoint, read_header_bytes
from .dtypes import ITEMSIZE, convert
from .errors import CheckpointError, OutputError
from .plan import RestorePlan, TensorPatch, patch_ranges

KERNEL_COPY_CHUNK = 256 * 1024 * 1024
# Weight formats that would carry POST's unrestored weights next to ours; never copied.
FOREIGN_WEIGHTS = (".bin", ".pth", ".pt", ".gguf", ".ckpt", ".h5", ".msgpack")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class WriteOptions:
    """How OUT is written: the writing half of ``merge``/``pro``'s options (planning has its own)."""

    overwrite: bool = False
    link: bool = False
    jobs: int = 2


@dataclass
class WriteResult:
    """What was written: file names, skipped files, and a sha256 per patched tensor."""

    out: Path
    files: list[str]
    skipped: list[str]
    tensor_sha256: dict[str, str]
    linked: list[str] = field(default_factory=list)
    bytes_from_pre: int = 0


# -- file listing -------------------------------------------------------------------------------


def post_files(post: Checkpoint) -> tuple[list[str], list[str]]:
    """POST's files to carry over (relative paths), and the ones deliberately left out.

    Hidden folders (``.git``, ``.cache``) are tool state, not model files. Pickle/GGUF weights would
    hold unrestored copies of the weights, so they are dropped and the user is told.
    """
    keep: list[str] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(post.root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fn), post.root)
            if rel in (PROVENANCE_NAME,):
                continue
            if fn.endswith(FOREIGN_WEIGHTS) or fn.startswith("consolidated"):
                skipped.append(rel)
            else:
                keep.append(rel)
    return keep, skipped


# -- output location ------------------------------------------------------------------------------


def check_output_location(out: Path, inputs: Mapping[str, Path]) -> None:
    """Refuse an OUT that is, contains, or sits inside an input: inputs must never be written."""
    o = out.resolve()
    for label, path in inputs.items():
        p = path.resolve()
        if o == p or p in o.parents:
            raise OutputError(f"{out}: OUT must not be {label} or lie inside it ({path})")
        if o in p.parents:
            raise OutputError(f"{out}: OUT must not contain {label} ({path})")


def check_free_space(parent: Path, needed: int) -> None:
    st = os.statvfs(parent)
    free = st.f_bavail * st.f_frsize
    if needed > free:
        raise OutputError(
            f"{parent}: {needed / 2**30:.2f} GiB needed but only {free / 2**30:.2f} GiB free",
            hint="free some space, write elsewhere, or use --link where POST is on the same disk",
        )


@contextlib.contextmanager
def staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of OUT, renamed onto OUT on success and removed on any failure.

    Ctrl-C and SIGTERM are held back while the folder is created and while OUT is swapped in, so an
    interruption lands either before anything exists or inside the ``try`` that removes it; it can
    never strand a temporary folder or leave OUT half-replaced.
    """
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: already exists", hint="pass --overwrite to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: the folder for OUT does not exist")
    held = _hold_signals()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.qkrestore-tmp-", dir=parent))
    except BaseException:
        _release_signals(held)
        raise
    try:
        _release_signals(held)  # a signal that came meanwhile is raised here, inside the try
        yield tmp
        held = _hold_signals()
        try:
            if out.exists() or out.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.qkrestore-old-", dir=parent))
                os.rename(out, old / "x")
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        finally:
            _release_signals(held)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_HELD = {signal.SIGINT, signal.SIGTERM}


def _hold_signals() -> set[int] | None:
    """Defer SIGINT/SIGTERM (main thread only); returns the mask to restore."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)


def _release_signals(previous: set[int] | None) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# -- copying --------------------------------------------------------------------------------------


def copy_file(src: Path, dst: Path, progress: Progress | None = None) -> None:
    """Copy by the kernel (``copy_file_range``), falling back to ``sendfile``-backed shutil."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        done = 0
        try:
            while done < size:
                n = os.copy_file_range(
                    fi.fileno(), fo.fileno(), min(KERNEL_COPY_CHUNK, size - done)
                )
                if n == 0:
                    break
                done += n
                if progress:
                    progress(n)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            fi.seek(done)
            fo.seek(done)
            while chunk := fi.read(CHUNK):
                fo.write(chunk)
                done += len(chunk)
                if progress:
                    progress(len(chunk))
        if done != size:
            raise CheckpointError(
                f"{src}: file changed size while copying ({done} of {size} bytes)"
            )
    shutil.copystat(src, dst)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def apply_patch(
    fd: int,
    patch: TensorPatch,
    pre: Checkpoint,
    post: Checkpoint,
    computed: Mapping[str, bytes] | None,
    digest: hashlib._Hash,
) -> int:
    """Overwrite the patch's rows in the open output file; returns bytes read from PRE."""
    src_info = pre.tensors[patch.pre_name]
    read = 0
    if patch.source == "computed":
        assert computed is not None
        data = computed[patch.name]
        pos = 0
        for dst_off, dst_len, _, _ in patch_ranges(patch, pre, post):
            piece = data[pos : pos + dst_len]
            _write_all(fd, piece, dst_off)
            digest.update(piece)
            pos += dst_len
        return 0
    # Chunks hold whole elements of both dtypes so a cast never splits a value.
    step = CHUNK - CHUNK % (ITEMSIZE[src_info.dtype] * ITEMSIZE[patch.dtype])
    for dst_off, _dst_len, src_off, src_len in patch_ranges(patch, pre, post):
        pos = 0
        for piece in pre.iter_chunks(src_info.file, src_off, src_len, step):
            read += len(piece)
            if patch.cast:
                piece = convert(piece, patch.pre_dtype, patch.dtype)
            _write_all(fd, piece, dst_off + pos)
            digest.update(piece)
            pos += len(piece)
    return read


def write_output(
    plan: RestorePlan,
    pre: Checkpoint,
    post: Checkpoint,
    out: Path,
    *,
    overwrite: bool = False,
    link: bool = False,
    computed: Mapping[str, bytes] | None = None,
    finalize: Callable[[Path, WriteResult], None] | None = None,
    progress: Progress | None = None,
    jobs: int = 2,
) -> WriteResult:
    """Write OUT from POST and the plan; ``finalize`` adds the card and provenance before the rename."""
    out = Path(out).absolute()
    check_output_location(out, {"PRE": pre.root, "POST": post.root})
    files, skipped = post_files(post)
    touched = set(plan.touched_files)
    shard_files = set(post.shards)
    needed = sum(
        (post.root / f).stat().st_size
        for f in files
        if not (link and f in shard_files and f not in touched)
    )
    if out.parent.is_dir():
        check_free_space(out.parent, needed)

    with staging_dir(out, overwrite) as tmp:
        result = WriteResult(out=out, files=files, skipped=skipped, tensor_sha256={})
        lock = threading.Lock()
        cancel = threading.Event()

        def step(n: int) -> None:
            if cancel.is_set():
                raise _Cancelled()
            if progress:
                progress(n)

        def one_file(rel: str) -> None:
            src, dst = post.root / rel, tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if link and rel in shard_files and rel not in touched:
                os.link(src.resolve(), dst)
                with lock:
                    result.linked.append(rel)
                step(src.stat().st_size)
                return
            copy_file(src, dst, step)
            if rel not in shard_files:
                return
            _check_shard_unchanged(post, rel, dst)
            patches = [p for p in plan.patches if p.file == rel]
            local_sha: dict[str, str] = {}
            if patches:
                fd = os.open(dst, os.O_WRONLY)
                try:
                    for patch in patches:
                        digest = hashlib.sha256()
                        n = apply_patch(fd, patch, pre, post, computed, digest)
                        local_sha[patch.name] = digest.hexdigest()
                        with lock:
                            result.bytes_from_pre += n
                finally:
                    os.close(fd)
            # Re-read in this worker, so the check overlaps the copies still running.
            sha = check_written_file(rel, dst, patches, pre, post, local_sha)
            with lock:
                result.tensor_sha256.update(sha)

        # Biggest files first so the parallel copies finish together.
        order = sorted(files, key=lambda f: -(post.root / f).stat().st_size)
        # A signal landing inside Thread.start() can leave a worker the pool does not know of, one
        # that would write into the staging folder after it is removed: hold signals while the
        # workers start, and take them inside the try that stops and joins every worker.
        held = _hold_signals()
        try:
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                futures = [pool.submit(one_file, rel) for rel in order]
                try:
                    _release_signals(held)
                    held = None
                    for fut in as_completed(futures):
                        fut.result()
                except BaseException:
                    cancel.set()
                    for fut in futures:
                        fut.cancel()
                    pool.shutdown(wait=True)
                    raise
        finally:
            _release_signals(held)
        result.linked.sort()
        result.tensor_sha256 = dict(sorted(result.tensor_sha256.items()))
        if finalize:
            finalize(tmp, result)
    return result


class _Cancelled(Exception):
    """Stops the other copy workers once one has failed or the run was interrupted."""


def _check_shard_unchanged(post: Checkpoint, rel: str, dst: Path) -> None:
    """The copied shard must still be the file POST's header described (detects a file changed under us)."""
    shard = post.shards[rel]
    size = dst.stat().st_size
    if size != shard.size:
        raise CheckpointError(
            f"{shard.path}: size is now {size} bytes, header promised {shard.size}; "
            "was POST changed while reading?"
        )


def check_written_file(
    rel: str,
    dst: Path,
    patches: list[TensorPatch],
    pre: Checkpoint,
    post: Checkpoint,
    range_sha: Mapping[str, str],
) -> dict[str, str]:
    """Re-read one written shard: header equal to POST's, each patched range hashing as written.

    One pass over each patched tensor feeds both digests: the planned ranges (compared with what
    was written) and the whole tensor (recorded in the provenance). Returns the whole-tensor sha256s.
    """
    if read_header_bytes(dst) != read_header_bytes(post.shards[rel].path):
        raise OutputError(f"{dst}: written header differs from POST's")
    tensor_sha: dict[str, str] = {}
    with open(dst, "rb") as fh:
        fd = fh.fileno()
        for patch in patches:
            info = post.tensors[patch.name]
            spans = [(off, off + n) for off, n, _, _ in patch_ranges(patch, pre, post)]
            if spans != sorted(spans):
                raise OutputError(f"'{patch.name}': plan rows are not in ascending order")
            ranges, whole = hashlib.sha256(), hashlib.sha256()
            pos, end = info.start, info.start + info.nbytes
            while pos < end:
                piece = os.pread(fd, min(CHUNK, end - pos), pos)
                if not piece:
                    raise OutputError(f"{dst}: ends inside tensor '{patch.name}'")
                whole.update(piece)
                view = memoryview(piece)
                for a, b in spans:
                    lo, hi = max(a, pos), min(b, pos + len(piece))
                    if lo < hi:
                        ranges.update(view[lo - pos : hi - pos])
                pos += len(piece)
            if ranges.hexdigest() != range_sha[patch.name]:
                raise OutputError(f"{dst}: tensor '{patch.name}' reads back differently")
            tensor_sha[patch.name] = whole.hexdigest()
    return tensor_sha
