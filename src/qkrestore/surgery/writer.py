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
from typing import Protocol

from ..errors import CheckpointError, OutputError, PlanError
from ..io.checkpoint import CHUNK, Checkpoint, read_header_bytes
from ..io.dtypes import TORCH_DTYPE_NAMES, cast_chunk, convert
from ..io.sourcefiles import folder_files
from ..io.weightfiles import is_other_format, is_weight_file
from .plan import RestorePlan, TensorPatch, patch_ranges

KERNEL_COPY_CHUNK = 256 * 1024 * 1024
# The provenance record's name (card.PROVENANCE_NAME, which imports nothing from here): an input's
# own record is never carried into OUT, whose record describes OUT.
PROVENANCE_NAME = "qkrestore.json"

Progress = Callable[[int], None]


class RowSource(Protocol):
    """Computed rows by tensor name (bytes in POST's dtype): all the writer asks of them."""

    def __getitem__(self, name: str, /) -> bytes: ...


@dataclass(frozen=True)
class WriteOptions:
    """How OUT is written: the writing half of ``merge``/``pro``'s options (planning has its own)."""

    overwrite: bool = field(
        default=False,
        metadata={
            "flags": ("--overwrite",),
            "help": "Replace OUT if it exists (only once the new one is complete).",
        },
    )
    link: bool = field(
        default=False,
        metadata={
            "flags": ("--link",),
            "help": "Hard-link untouched shards instead of copying (they then share storage "
            "with POST).",
        },
    )
    jobs: int = field(
        default=2,
        metadata={"flags": ("--jobs", "-j"), "help": "Files copied in parallel.", "min": 1},
    )


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

    Hidden folders (``.git``, ``.cache``) are tool state, not model files. Of the weight files, only
    the set the loader reads (the one the plan was made on) is carried: every other weight file
    (another safetensors set, a variant, stray shards, pickle/GGUF/Mistral-format files) would hold
    unrestored copies of the weights, so it is dropped and the user is told. Links and special files
    are checked by :func:`qkrestore.io.sourcefiles.folder_files` (outside links and FIFOs are refused).
    """
    in_use = set(post.shards)
    if post.view is not None:
        in_use.add(post.view.entry)
    keep: list[str] = []
    skipped: list[str] = []
    for rel in folder_files(post.root):
        if rel in (PROVENANCE_NAME,):
            continue
        if rel in in_use:
            keep.append(rel)
        elif is_weight_file(rel) or is_other_format(rel):
            skipped.append(rel)
        else:
            keep.append(rel)
    return keep, skipped


def preflight(plan: RestorePlan, pre: Checkpoint, post: Checkpoint) -> list[str]:
    """Every refusal the writer would make about its inputs, made before anything is printed.

    Returns the POST files that will be skipped (weights outside the set the loader reads).
    """
    check_restorable(plan, pre, post)
    return post_files(post)[1] if post.root.is_dir() else []


def check_restorable(plan: RestorePlan, pre: Checkpoint, post: Checkpoint) -> None:
    """Refuse a plan that needs what the files cannot give; untouched tensors need nothing.

    A restored tensor needs byte-addressable rows (sub-byte dtypes only where a row fills whole
    bytes), and a cast between two dtypes torch can convert. A tensor that POST's or PRE's index
    lists but no shard holds is refused only where the plan restores its module: elsewhere it is a
    defect that loaders survive (reported as a note, see :attr:`Checkpoint.defects`).
    """
    for patch in plan.patches:
        out, src = post.info(patch.name), pre.info(patch.pre_name)
        for r0, r1 in patch.rows:  # raises, naming the tensor, for rows that split bytes
            out.byte_range(r0, r1), src.byte_range(r0, r1)
        if patch.cast and not (src.dtype in TORCH_DTYPE_NAMES and out.dtype in TORCH_DTYPE_NAMES):
            raise PlanError(
                f"'{patch.name}': {src.dtype} in PRE but {out.dtype} in POST, and qkrestore cannot "
                "convert between them",
                hint="give PRE and POST in the same dtype",
            )
    for ckpt, names in (
        (post, [p.name for p in plan.patches]),
        (pre, [p.pre_name for p in plan.patches]),
    ):
        for name, file in ckpt.phantoms.items():
            if _needed_by(name, names, plan.targets):
                index = ckpt.view.entry if ckpt.view else "the index"
                raise CheckpointError(
                    f"{ckpt.root / file}: tensor '{name}' is in {index} but not in this shard, "
                    "and the plan restores its module",
                    hint="re-save the checkpoint so that its index and shards agree",
                )


def _needed_by(name: str, planned: list[str], targets: list[str]) -> bool:
    """Would the plan have taken ``name`` had a shard held it?

    Yes where it belongs to a planned module (``q_proj.bias`` beside a planned ``q_proj.weight``,
    an FP8 scale), or sits in a planned attention module under a target's name (``q_norm``).
    """
    module = name.rsplit(".", 1)[0]
    attention = module.rsplit(".", 1)[0]
    leaf = module.rsplit(".", 1)[-1]
    for p in planned:
        p_module = p.rsplit(".", 1)[0]
        if module == p_module:
            return True
        if attention == p_module.rsplit(".", 1)[0] and any(
            leaf.startswith(f"{t}_") for t in targets
        ):
            return True
    return False


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
        # The body has fsynced every file; the folder gets the mode mkdir would have given it
        # (mkdtemp makes it 0700), then its entries are made durable before it takes OUT's name.
        os.chmod(tmp, 0o777 & ~current_umask())
        fsync_path(tmp, directory=True)
        held = _hold_signals()
        try:
            if out.exists() or out.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.qkrestore-old-", dir=parent))
                os.rename(out, old / "x")
                os.rename(tmp, out)
                fsync_path(parent, directory=True)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
                fsync_path(parent, directory=True)
        finally:
            _release_signals(held)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[tuple[Path, set[str]]]:
    """The one way any output is written: a staging folder, every file and folder in it fsynced,
    then renamed onto OUT (see :func:`staging_dir`).

    Yields the staging folder and a set the body fills with the relative paths it has already
    fsynced itself (workers flush as they go); everything else is flushed before the rename.
    """
    with staging_dir(out, overwrite) as tmp:
        synced: set[str] = set()
        yield tmp, synced
        sync_tree(tmp, synced)


def copy_files(pairs: list[tuple[Path, Path]], jobs: int, progress: Progress | None = None) -> None:
    """Copy ``(src, dst)`` pairs in ``jobs`` worker threads (biggest first), creating folders."""
    for _, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
    order = sorted(pairs, key=lambda p: -p[0].stat().st_size)
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="qkrestore-copy") as pool:
        for fut in [pool.submit(copy_file, src, dst, progress) for src, dst in order]:
            fut.result()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``).

    ``os.umask`` can only be read by setting it, which would race with other threads creating files.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_path(path: Path, *, directory: bool = False) -> None:
    """Flush a file's data, or a folder's entries, to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(top: Path, done: set[str]) -> None:
    """fsync every file under ``top`` not in ``done`` (relative paths), then each sub-folder.

    Sub-folders go deepest first, so a folder is flushed after the entries made in it; ``top``
    itself is left to the caller, which flushes it last, just before the rename.
    """
    for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
        folder = Path(dirpath)
        for fn in filenames:
            path = folder / fn
            if path.relative_to(top).as_posix() not in done:
                fsync_path(path)
        if folder != top:
            fsync_path(folder, directory=True)


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
    computed: RowSource | None,
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
    # Chunks hold whole elements of both dtypes so a cast never splits a value; a byte copy
    # (any dtype, sub-byte ones included) can split anywhere.
    step = cast_chunk(CHUNK, patch.pre_dtype, patch.dtype) if patch.cast else CHUNK
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
    computed: RowSource | None = None,
    finalize: Callable[[Path, WriteResult], None] | None = None,
    progress: Progress | None = None,
    jobs: int = WriteOptions().jobs,
) -> WriteResult:
    """Write OUT from POST and the plan; ``finalize`` adds the card and provenance before the rename."""
    out = Path(out).absolute()
    check_output_location(out, {"PRE": pre.root, "POST": post.root})
    check_restorable(plan, pre, post)
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

    with staged_output(out, overwrite) as (tmp, synced):
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
                fsync_path(dst)
                with lock:
                    synced.add(rel)
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
            fsync_path(dst)  # in the worker too, so flushing overlaps the other copies
            with lock:
                result.tensor_sha256.update(sha)
                synced.add(rel)

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
        # staged_output flushes what finalize wrote, the hard links' inodes and the sub-folders,
        # then the folder itself before renaming it onto OUT.
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
