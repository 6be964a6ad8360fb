"""Tensors PRE has and POST lacks, carried into OUT (``--carry-missing``).

Trainers' saves sometimes drop tensors that inference engines need (Qwen3-Next/Qwen3.5 ``mtp.*``
heads, vision towers). With ``--carry-missing`` OUT gets them from PRE, byte for byte, in one extra
shard that OUT's index lists; POST's own shards stay byte-identical. A single-file POST has no index
to extend (and a loader reads ``model.safetensors`` before any index), so the option needs a
sharded POST.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import PlanError
from ..io.checkpoint import CHUNK, INDEX_NAME, Checkpoint
from .plan import RestorePlan

CARRIED_FILE = "model-carried-from-pre.safetensors"


def check_carry(plan: RestorePlan, post: Checkpoint) -> None:
    """Refuse, before any write, what cannot be carried."""
    if plan.carried and post.index is None:
        raise PlanError(
            f"{post.root}: --carry-missing needs POST saved in shards with {INDEX_NAME} (a single "
            "model.safetensors has no index to add the carried tensors to)",
            hint="re-save POST with save_pretrained(max_shard_size=...) or leave the option out",
        )
    if CARRIED_FILE in post.shards:
        raise PlanError(f"{post.root / CARRIED_FILE}: POST already holds a carried-tensor shard")


def carried_header(plan: RestorePlan, pre: Checkpoint) -> bytes:
    """The safetensors header of the extra shard: PRE's tensors in plan order, packed."""
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for c in plan.carried:
        nbytes = pre.tensors[c.pre_name].nbytes
        entries[c.name] = {
            "dtype": c.dtype,
            "shape": list(c.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(text).to_bytes(8, "little") + text


def write_carried(folder: Path, plan: RestorePlan, pre: Checkpoint) -> dict[str, str]:
    """Write the extra shard and extend OUT's index; returns a sha256 per carried tensor."""
    digests: dict[str, str] = {}
    path = folder / CARRIED_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        header = carried_header(plan, pre)
        os.write(fd, header)
        for c in plan.carried:
            info = pre.tensors[c.pre_name]
            digest = hashlib.sha256()
            for piece in pre.iter_chunks(info.file, info.start, info.nbytes, CHUNK):
                digest.update(piece)
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            digests[c.name] = digest.hexdigest()
    finally:
        os.close(fd)
    index_path = folder / INDEX_NAME
    index_path.write_bytes(carried_index(index_path.read_bytes(), plan, pre))
    return digests


def carried_index(post_index: bytes, plan: RestorePlan, pre: Checkpoint) -> bytes:
    """POST's index with the carried tensors added to its weight map and total size."""
    index = json.loads(post_index)
    weight_map = index.setdefault("weight_map", {})
    for c in plan.carried:
        weight_map[c.name] = CARRIED_FILE
    meta = index.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("total_size"), int):
        meta["total_size"] += sum(pre.tensors[c.pre_name].nbytes for c in plan.carried)
    return (json.dumps(index, indent=2) + "\n").encode("utf-8")


__all__ = ["CARRIED_FILE", "carried_header", "carried_index", "check_carry", "write_carried"]
