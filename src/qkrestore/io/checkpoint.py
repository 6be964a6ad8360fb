"""A read-only, lazy view of one safetensors checkpoint folder.

Opening a checkpoint reads ``config.json``, the index (if sharded) and each shard's header, and checks
that they describe a sane file: every shard name stays inside the folder, every header's offsets lie in
its file and match its dtype and shape, and the index and the shards agree. Tensor bytes are read only
when asked, with ``os.pread`` at the tensor's offset, so a 100 GB checkpoint costs a few megabytes to
open.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, ConfigError
from .dtypes import BITSIZE, ITEMSIZE
from .sourcefiles import checked_file
from .weightfiles import (
    INDEX_NAME,
    PICKLE_WEIGHT_NAMES,
    SINGLE_NAME,
    LoaderView,
    is_entry_name,
    is_weight_file,
    loader_view,
    pickle_files,
)

CONFIG_NAME = "config.json"
CHUNK = 8 * 1024 * 1024  # bytes moved at a time wherever bytes pass through Python
# The safetensors library refuses headers above 100 MB; a larger length field is a lie or an attack,
# and must be refused before anything is allocated for it.
MAX_HEADER_BYTES = 100 * 1024 * 1024
_OPEN_LOCK = threading.Lock()
# Malformed JSON can fail as a decode error, as a ValueError (integers beyond Python's digit
# limit) or as a RecursionError (absurd nesting); all are the file's fault, not ours.
JSON_ERRORS = (ValueError, RecursionError)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:120]


__all__ = ["INDEX_NAME", "PICKLE_WEIGHT_NAMES", "SINGLE_NAME", "Checkpoint", "Shard", "TensorInfo"]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: its shard, dtype, shape and absolute byte range in the file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the shard file
    nbytes: int

    @property
    def itemsize(self) -> int:
        """Bytes per element; sub-byte dtypes (F4, F6_*) have none and are refused here."""
        if self.dtype not in ITEMSIZE:
            raise CheckpointError(
                f"{self.file}: tensor '{self.name}' is {self.dtype}, whose elements are smaller "
                "than a byte; it can be copied but not converted"
            )
        return ITEMSIZE[self.dtype]

    @property
    def rows(self) -> int:
        """Length of the first axis (1 for scalars); row ranges index this axis."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        """Bytes in one row: one output feature of a weight, one element of a vector.

        For sub-byte dtypes a row must still fill whole bytes, or rows cannot be addressed in the
        file (safetensors packs elements without padding between rows).
        """
        if not self.rows:
            return 0
        row_bits = math.prod(self.shape[1:]) * BITSIZE[self.dtype]
        if row_bits % 8:
            raise CheckpointError(
                f"{self.file}: tensor '{self.name}' ({self.dtype}, shape {list(self.shape)}) has "
                f"rows of {row_bits} bits, which do not start on byte boundaries; its rows "
                "cannot be restored separately"
            )
        return row_bits // 8

    def byte_range(self, r0: int, r1: int) -> tuple[int, int]:
        """(offset from :attr:`start`, length) of rows ``[r0, r1)``; the whole tensor always works."""
        if (r0, r1) == (0, self.rows):
            return 0, self.nbytes
        return r0 * self.row_bytes, (r1 - r0) * self.row_bytes


@dataclass(frozen=True)
class Shard:
    """One safetensors file: its header as parsed and as raw bytes (copied unchanged to outputs)."""

    file: str
    path: Path
    size: int
    header_len: int
    metadata: dict[str, str] | None
    tensors: tuple[str, ...]  # in offset order

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


@dataclass
class Checkpoint:
    """A checkpoint folder: config, shards, and a name → :class:`TensorInfo` map.

    Only the weight set the loader reads (see :mod:`qkrestore.io.weightfiles`) is opened. ``defects``
    lists what is wrong in the folder but does not stop a loader (an index naming a tensor its shard
    does not hold); ``phantoms`` maps each such tensor to the shard the index names.
    """

    root: Path
    config: dict[str, Any]
    shards: dict[str, Shard]
    tensors: dict[str, TensorInfo]
    index: dict[str, Any] | None = None
    _fds: dict[str, int] = field(default_factory=dict, repr=False)
    view: LoaderView | None = None
    defects: list[str] = field(default_factory=list)
    phantoms: dict[str, str] = field(default_factory=dict)
    same_as: list[str] = field(default_factory=list)  # rival sets found identical to this one
    partial: bool = False

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        partial: bool = False,
        weights: str | None = None,
    ) -> Checkpoint:
        """Open and check a folder; ``partial`` tolerates shards that were not downloaded.

        A partial view (PRE fetched from the Hub with only the shards the plan needs) knows the
        tensors of the shards present; the others are simply absent from :attr:`tensors`.

        ``weights`` names the weight set to read (``model.safetensors`` or an index) where the
        folder holds more than one; without it the loader's choice is taken, and a second set that
        differs from it is refused, since nobody can tell which of the two is the model.
        """
        root = Path(root)
        if not root.exists():
            raise CheckpointError(f"{root}: no such folder")
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a folder (give the folder that holds config.json)")
        config = read_config(root)
        if weights is not None:
            _check_choice(root, weights)
        view = loader_view(root, config, weights)
        if view is None:
            pickled = pickle_files(root)
            if pickled:
                raise CheckpointError(
                    f"{root / pickled[0]}: pickle checkpoints are never loaded (unpickling runs code)",
                    hint="convert it to safetensors first, e.g. with transformers' save_pretrained("
                    "safe_serialization=True)",
                )
            raise CheckpointError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME}")
        ckpt = cls._open_set(root, config, view, partial)
        if view.chosen_by == "loader":
            for rival in view.rivals:
                with cls._open_set(
                    root, config, LoaderView(rival, "rival", "option"), partial
                ) as other:
                    why = different_weights(ckpt, other)
                if why is None:
                    ckpt.same_as.append(rival)
                    continue
                raise CheckpointError(
                    f"{root}: holds two different weight sets, {view.entry} (the one transformers "
                    f"loads: {view.reason}) and {rival} ({why})",
                    hint="name the one that is the model with --pre-weights/--post-weights FILE, "
                    "or remove the stale one",
                )
        return ckpt

    @classmethod
    def _open_set(
        cls, root: Path, config: dict[str, Any], view: LoaderView, partial: bool
    ) -> Checkpoint:
        """Read the headers of one weight set and check it against its index."""
        entry_path = checked_file(root, _safe_relative(view.entry, root))
        if view.sharded:
            index, weight_map = _read_index(entry_path)
            files = sorted(set(weight_map.values()))
        else:
            index, weight_map = None, None
            files = [view.entry]
        shards: dict[str, Shard] = {}
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            path = checked_file(root, _safe_relative(file, entry_path))
            if not path.is_file():
                if partial:
                    continue
                raise CheckpointError(f"{path}: shard listed in {view.entry} is missing")
            shard, infos = read_header(path, file)
            shards[file] = shard
            for info in infos:
                tensors[info.name] = info

        defects: list[str] = []
        phantoms: dict[str, str] = {}
        if weight_map is not None:
            for name, file in weight_map.items():
                if file not in shards:  # partial view: shard not downloaded
                    continue
                found = tensors.get(name)
                if found is None and not partial:
                    # transformers reads every tensor of every listed shard and reports a listed
                    # name nobody holds as a missing key: a defect, not a reason to refuse.
                    phantoms[name] = file
                    defects.append(
                        f"{root / file}: tensor '{name}' is in {view.entry} but not in this shard"
                    )
                elif found is not None and found.file != file:
                    defects.append(
                        f"{root / file}: tensor '{name}' is in {view.entry} under this shard but "
                        f"lives in {found.file}"
                    )
            for name, info in tensors.items():
                if name not in weight_map:
                    raise CheckpointError(
                        f"{root / info.file}: tensor '{name}' is in the shard but not in {view.entry}"
                    )
        return cls(
            root=root,
            config=config,
            shards=shards,
            tensors=tensors,
            index=index,
            view=view,
            defects=defects,
            phantoms=phantoms,
            partial=partial,
        )

    def weight_files(self) -> dict[str, Any]:
        """Which weight files are in use and which are not (for ``inspect-layers`` and summaries)."""
        in_use = {self.view.entry} if self.view else set()
        in_use |= set(self.shards)
        not_read: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                rel = Path(dirpath, fn).relative_to(self.root).as_posix()
                if rel not in in_use and is_weight_file(rel):
                    not_read.append(rel)
        return {
            "entry": self.view.entry if self.view else None,
            "reason": self.view.reason if self.view else None,
            "chosen_by": self.view.chosen_by if self.view else None,
            "files": sorted(self.shards),
            "identical_sets_not_read": list(self.same_as),
            "not_read": not_read,
            "defects": list(self.defects),
        }

    # -- reading ------------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor '{name}'") from None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> bytes:
        """The bytes of a tensor, or of rows ``[r0, r1)`` of its first axis."""
        info = self.info(name)
        r0, r1 = rows if rows is not None else (0, info.rows)
        if not 0 <= r0 <= r1 <= info.rows:
            raise CheckpointError(f"{self.root / info.file}: rows {r0}:{r1} out of '{name}'")
        offset, length = info.byte_range(r0, r1)
        return self.pread(info.file, info.start + offset, length)

    def iter_chunks(self, file: str, offset: int, length: int, chunk: int) -> Iterator[bytes]:
        """Read ``length`` bytes at ``offset`` in pieces of at most ``chunk`` bytes."""
        end = offset + length
        while offset < end:
            n = min(chunk, end - offset)
            yield self.pread(file, offset, n)
            offset += n

    def pread(self, file: str, offset: int, length: int) -> bytes:
        fd = self._fds.get(file)
        if fd is None:
            with _OPEN_LOCK:  # the writer reads from several threads
                fd = self._fds.get(file)
                if fd is None:
                    fd = os.open(self.shards[file].path, os.O_RDONLY)
                    self._fds[file] = fd
        got = os.pread(fd, length, offset)
        if len(got) == length:  # the usual case: no extra copies of the chunk
            return got
        out = bytearray(got)
        while len(out) < length:
            got = os.pread(fd, length - len(out), offset + len(out))
            if not got:
                raise CheckpointError(
                    f"{self.shards[file].path}: file ended early (was it changed while reading?)"
                )
            out += got
        return bytes(out)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.shards.values())


# -- weight sets ----------------------------------------------------------------------------------


def _check_choice(root: Path, weights: str) -> None:
    """The user's ``--*-weights`` must name a safetensors file or index at the folder's top level."""
    present = sorted(p.name for p in root.iterdir() if is_entry_name(p.name) and p.is_file())
    if "/" in weights or not is_entry_name(weights) or weights not in present:
        raise CheckpointError(
            f"{root}: no weight set named {weights!r} here",
            hint=f"name one of: {', '.join(present) or 'none found'}",
        )


def different_weights(a: Checkpoint, b: Checkpoint) -> str | None:
    """Why two weight sets of one folder are not the same model (``None`` if they are).

    Names, dtypes and shapes are compared first, then the bytes tensor by tensor, stopping at the
    first difference; a stale copy usually differs in its first few megabytes. Tensors of shards a
    partial view lacks are not compared.
    """
    only = sorted(set(a.tensors) ^ set(b.tensors))
    if only and not (a.partial or b.partial):
        return f"tensor '{only[0]}' is in only one of them"
    for name in sorted(set(a.tensors) & set(b.tensors)):
        x, y = a.tensors[name], b.tensors[name]
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            return f"tensor '{name}' is {x.dtype} {list(x.shape)} in one, {y.dtype} {list(y.shape)} in the other"
    for name in sorted(set(a.tensors) & set(b.tensors)):
        x, y = a.tensors[name], b.tensors[name]
        chunks = zip(
            a.iter_chunks(x.file, x.start, x.nbytes, CHUNK),
            b.iter_chunks(y.file, y.start, y.nbytes, CHUNK),
        )
        if any(p != q for p, q in chunks):
            return f"tensor '{name}' differs"
    return None


# -- config ---------------------------------------------------------------------------------------


def refuse_adapter(root: Path) -> None:
    """A PEFT adapter folder (adapter_config.json, no config.json) given where a model belongs:
    say what it is and what to pass instead, rather than that config.json (or a tokenizer) is
    missing. Its base model's name comes from adapter_config.json."""
    if (root / CONFIG_NAME).is_file() or not os.path.lexists(root / "adapter_config.json"):
        return
    try:
        base = json.loads((root / "adapter_config.json").read_text(encoding="utf-8"))
        named = base.get("base_model_name_or_path") if isinstance(base, dict) else None
    except (OSError, *JSON_ERRORS):
        named = None
    base_text = f" ({named})" if isinstance(named, str) and named else ""
    raise ConfigError(
        f"{root}: a PEFT adapter (adapter_config.json, no config.json), not a model",
        hint=f"it is a PEFT adapter folder: pass its base model{base_text}, or merge it into the "
        f"base first (qkrestore merge BASE {root} --merge-adapter -o MERGED, then pass MERGED); "
        "merge, pro and sweep take an adapter as POST",
    )


def read_config(root: Path) -> dict[str, Any]:
    path = checked_file(root, CONFIG_NAME)
    if not path.is_file():
        refuse_adapter(Path(root))
        raise ConfigError(f"{path}: missing (a checkpoint folder needs its config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except JSON_ERRORS as exc:
        raise ConfigError(f"{path}: not valid JSON ({_short(exc)})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    return config


# -- index ----------------------------------------------------------------------------------------


def _read_index(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates(path))
    except JSON_ERRORS as exc:
        raise CheckpointError(f"{path}: not valid JSON ({_short(exc)})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: no 'weight_map' object")
    for name, file in weight_map.items():
        if not isinstance(file, str):
            raise CheckpointError(f"{path}: tensor '{name}' maps to a non-string shard name")
        _safe_relative(file, path)
    return index, weight_map


def _safe_relative(file: str, where: Path) -> PurePosixPath:
    """Refuse a shard name that could reach outside the checkpoint folder."""
    bad = (
        not file
        or "\x00" in file
        or "\\" in file
        or file.startswith("/")
        or (len(file) > 1 and file[1] == ":")
    )
    rel = PurePosixPath(file)
    if bad or any(part in ("..", "") for part in rel.parts) or rel.is_absolute():
        raise CheckpointError(f"{where}: shard name {file!r} is not a plain file inside the folder")
    return rel


def _no_duplicates(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointError(f"{path}: duplicate key '{key}'")
            out[key] = value
        return out

    return hook


# -- safetensors header ---------------------------------------------------------------------------


def read_header_bytes(path: Path) -> tuple[int, bytes]:
    """The header length field and the header bytes, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(
                f"{path}: header length {n} does not fit the file ({size} bytes); truncated or corrupt"
            )
        raw = fh.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated safetensors header")
    return n, raw


def read_header(path: Path, file: str) -> tuple[Shard, list[TensorInfo]]:
    """Parse and check a safetensors header; return the shard and its tensors in offset order."""
    size = path.stat().st_size
    n, raw = read_header_bytes(path)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates(path))
    except JSON_ERRORS as exc:
        raise CheckpointError(
            f"{path}: safetensors header is not valid JSON ({_short(exc)})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    data_len = size - 8 - n
    infos: list[TensorInfo] = []
    for name, entry in header.items():
        infos.append(_tensor_info(path, file, name, entry, 8 + n, data_len))
    infos.sort(key=lambda t: (t.start, t.nbytes))
    # The safetensors library reads only a data area that its tensors tile exactly, with no gap
    # and no trailing bytes; a file that does not is refused here rather than copied into OUT.
    end = 8 + n
    for info in infos:
        if info.start < end:
            raise CheckpointError(f"{path}: tensor '{info.name}' overlaps the tensor before it")
        if info.start > end:
            raise CheckpointError(
                f"{path}: {info.start - end} bytes before tensor '{info.name}' belong to no tensor "
                "(the safetensors library refuses such a file)"
            )
        end = info.start + info.nbytes
    if end != size:
        raise CheckpointError(
            f"{path}: the last {size - end} bytes belong to no tensor "
            "(the safetensors library refuses such a file)"
        )
    shard = Shard(
        file=file,
        path=path,
        size=size,
        header_len=n,
        metadata=metadata,
        tensors=tuple(t.name for t in infos),
    )
    return shard, infos


def _tensor_info(
    path: Path, file: str, name: str, entry: Any, data_start: int, data_len: int
) -> TensorInfo:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in BITSIZE:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r} (not a safetensors dtype)")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise CheckpointError(f"{where}: data_offsets {offsets} are out of order")
    if end > data_len:
        raise CheckpointError(f"{where}: data_offsets {offsets} run past the end of the file")
    bits = math.prod(shape) * BITSIZE[dtype]
    if bits % 8:
        raise CheckpointError(
            f"{where}: {math.prod(shape)} elements of {dtype} do not fill whole bytes"
        )
    expected = bits // 8
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: {end - begin} bytes in data_offsets, but shape {shape} of {dtype} needs "
            f"{expected}"
        )
    return TensorInfo(
        name=name,
        file=file,
        dtype=dtype,
        shape=tuple(shape),
        start=data_start + begin,
        nbytes=expected,
    )
