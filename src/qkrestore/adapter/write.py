"""The two outputs of an adapter job: a PEFT adapter folder, or a full checkpoint in PRE's layout.

* Adapter out: ``adapter_model.safetensors`` is written tensor by tensor in the input's order with
  the input's header metadata; untouched tensors are the input's bytes. ``adapter_config.json`` is
  the input's, with dropped modules added to ``exclude_modules`` (a regular expression of their
  exact names, united with any the input had) so that peft does not re-create them empty and does
  not warn about missing keys. Every other file of the adapter folder (tokenizer, chat template)
  is carried over.
* Model out: PRE's files are copied by the kernel, then each tensor the adapter changes is merged
  in float32, cast to PRE's dtype and written in place at PRE's offset (same dtype, same shape, so
  same layout). One tensor at a time. Restored rows are PRE's bytes. The adapter folder's
  tokenizer and chat-template files replace PRE's: they are what the fine-tune used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from ..io.checkpoint import Checkpoint
from ..io.sourcefiles import folder_files
from ..io.tensors import nonfinite
from ..io.weightfiles import is_other_format
from ..surgery.card import CARD_NAME
from ..surgery.writer import PROVENANCE_NAME, copy_file, copy_files, post_files
from .config import CONFIG_NAME, WEIGHTS_NAME
from .edit import AdapterEdits, read_tensor
from .plan import DROP, AdapterPlan
from .reader import EMBEDDING, LoraAdapter, LoraModule

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None]
ADAPTER_OWN = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, PROVENANCE_NAME)


def adapter_extra_files(adapter: LoraAdapter) -> list[str]:
    """Files of the adapter folder other than its weights, config, card and our provenance.

    Listed by :func:`qkrestore.io.sourcefiles.folder_files`, as a checkpoint folder's are: a link
    leaving the folder, a FIFO or a device file is refused, never followed or read.
    """
    out = []
    for rel in folder_files(adapter.root):
        fn = rel.rsplit("/", 1)[-1]
        if rel in ADAPTER_OWN or fn.startswith("adapter_model") or is_other_format(fn):
            continue
        out.append(rel)
    return out


def output_config(raw: dict[str, Any], pre_id: str | None) -> dict[str, Any]:
    """The adapter's config for OUT, naming its base by Hub id, never by a local path.

    peft records ``base_model_name_or_path`` as given to ``from_pretrained``: for a local base an
    absolute path of the trainer's machine, which ``push`` would upload. OUT names PRE's Hub id
    where one is known (as the card does); otherwise a name that is not a path is kept and a path
    is dropped (``null``, which peft accepts: the base is then the model the adapter is loaded on).
    """
    config = dict(raw)
    base = config.get("base_model_name_or_path")
    if pre_id:
        config["base_model_name_or_path"] = pre_id
    elif isinstance(base, str) and base and is_local_path(base):
        config["base_model_name_or_path"] = None
    return config


def is_local_path(name: str) -> bool:
    """A name that points at this machine's files rather than a Hub repo id."""
    return (
        name.startswith(("/", "~", ".", "\\"))
        or Path(name).expanduser().exists()
        or name.count("/") > 1
        or (len(name) > 1 and name[1] == ":")
    )


def exclude_regex(existing: str | list[str] | None, names: list[str]) -> str | list[str] | None:
    """``exclude_modules`` that also excludes ``names`` exactly, keeping what was excluded before.

    peft matches a string with ``re.fullmatch`` and a list entry ``e`` when the name equals ``e`` or
    ends with ``.e``; the list form is rewritten as the equivalent expression.
    """
    if not names:
        return existing
    parts = [re.escape(n) for n in sorted(names)]
    if isinstance(existing, str) and existing:
        parts.insert(0, f"(?:{existing})")
    elif isinstance(existing, list) and existing:
        parts.insert(0, "(?:.*\\.)?(?:" + "|".join(re.escape(e) for e in existing) + ")")
    return "|".join(parts)


def write_safetensors(
    path: Path,
    src: Checkpoint,
    file: str,
    skip: set[str],
    values: dict[str, bytes],
) -> int:
    """A safetensors file holding ``src``'s tensors (in file order) less ``skip``, edits applied."""
    shard = src.shards[file]
    entries: dict[str, Any] = {}
    if shard.metadata is not None:
        entries["__metadata__"] = shard.metadata
    blobs: list[tuple[str, bytes | None]] = []
    offset = 0
    for name in shard.tensors:
        if name in skip:
            continue
        info = src.tensors[name]
        entries[name] = {
            "dtype": info.dtype,
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
        blobs.append((name, values.get(name)))
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # safetensors aligns the data to 8 bytes
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        for name, data in blobs:
            fh.write(data if data is not None else src.read(name))
    return 8 + len(header) + offset


def write_adapter(
    folder: Path,
    adapter: LoraAdapter,
    aplan: AdapterPlan,
    edits: AdapterEdits,
    pre_id: str | None,
    jobs: int,
) -> dict[str, Any]:
    """Adapter out into ``folder`` (a staging folder); returns what was written."""
    extra = adapter_extra_files(adapter)  # refusals first, before any byte is written
    size = write_safetensors(
        folder / WEIGHTS_NAME, adapter.weights, WEIGHTS_NAME, edits.dropped_keys, edits.values
    )
    config = output_config(adapter.config.raw, pre_id)
    dropped = aplan.dropped()
    config["exclude_modules"] = exclude_regex(config.get("exclude_modules"), dropped)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    copy_files([(adapter.root / rel, folder / rel) for rel in extra], jobs)
    return {
        "kind": "adapter",
        "adapter_bytes_in": adapter.file.stat().st_size,
        "adapter_bytes_out": size,
        "dropped_modules": dropped,
        "files": [WEIGHTS_NAME, CONFIG_NAME, *extra],
        "adapter_sha256": _sha256(folder / WEIGHTS_NAME),
    }


# -- model out ------------------------------------------------------------------------------------


def merged_weight(
    w: torch.Tensor, mod: LoraModule, a: torch.Tensor, b: torch.Tensor, m: torch.Tensor | None
) -> torch.Tensor:
    """PRE's weight plus the module's delta, in float32 (peft's ``get_delta_weight`` and DoRA).

    ``W + s·(B·A)`` is accumulated in place (``addmm_``), so a merge holds one float32 copy of the
    weight, not three.
    """
    import torch

    merged = w.to(torch.float32, copy=True)
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    if mod.kind == EMBEDDING:
        merged.add_((b32 @ a32).T, alpha=mod.scaling)
    else:
        merged.addmm_(b32, a32, alpha=mod.scaling)
    if m is not None:
        norm = torch.linalg.norm(merged, dim=1)
        merged.mul_((m.to(torch.float32) / norm).unsqueeze(1))
    return merged


def write_model(
    folder: Path,
    pre: Checkpoint,
    adapter: LoraAdapter,
    aplan: AdapterPlan,
    edits: AdapterEdits,
    progress: Progress | None,
    jobs: int,
) -> dict[str, Any]:
    """Model out into ``folder``: PRE's files, with every adapter change merged in place.

    The kernel copies PRE's files in worker threads while this thread imports torch and merges
    tensor after tensor (both release the GIL); a merged tensor is written as soon as its shard's
    copy is complete. Memory holds one tensor at a time.
    """
    files, skipped = post_files(pre)
    files = [f for f in files if f != CARD_NAME]
    for rel in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="qkrestore-copy")
    fds: dict[str, int] = {}
    merged_tensors = 0
    try:
        copies = {
            rel: pool.submit(copy_file, pre.root / rel, folder / rel, progress) for rel in files
        }
        for file, data, start in _merged_tensors(pre, adapter, aplan, edits):
            copies[file].result()
            _pwrite(fds, folder / file, data, start)
            merged_tensors += 1
        for future in copies.values():
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for fd in fds.values():
            os.close(fd)
    carried = [f for f in adapter_extra_files(adapter) if f not in pre.shards]
    for rel in carried:
        if (folder / rel).exists():
            os.unlink(folder / rel)  # PRE's file of the same name: replace it, never edit it
    copy_files([(adapter.root / rel, folder / rel) for rel in carried], jobs)
    return {
        "kind": "model",
        "files": files + [f for f in carried if f not in files],
        "skipped_files": skipped,
        "merged_tensors": merged_tensors,
    }


def _merged_tensors(
    pre: Checkpoint, adapter: LoraAdapter, aplan: AdapterPlan, edits: AdapterEdits
) -> Iterator[tuple[str, bytes, int]]:
    """(shard, bytes in PRE's dtype, offset) of every tensor the adapter changes, one at a time."""
    from ..io.dtypes import to_bytes, to_tensor, torch_dtype

    actions = aplan.by_module()
    restore_rows = {p.name: p.rows for p in aplan.plan.patches if p.source == "pre"}

    def value(key: str) -> torch.Tensor:
        if key not in edits.values:
            return read_tensor(adapter.weights, key)
        info = adapter.weights.tensors[key]
        return to_tensor(edits.values[key], info.dtype, info.shape)

    mods = [m for m in adapter.modules.values() if actions[m.name].action != DROP]
    mods.sort(key=lambda m: (pre.info(m.weight_name).file, pre.info(m.weight_name).start))
    for mod in mods:
        info = pre.info(mod.weight_name)
        w = read_tensor(pre, mod.weight_name)
        if mod.weight_name in adapter.saved:  # a saved embedding replaces PRE's before the delta
            w = value(adapter.saved[mod.weight_name]).to(w.dtype)
        m = value(mod.magnitude.name) if mod.magnitude is not None else None
        new = merged_weight(w, mod, value(mod.a.name), value(mod.b.name), m)
        new = new.to(torch_dtype(info.dtype))
        if nonfinite(new):
            raise PlanError(
                f"{adapter.file}: module '{mod.name}' merged into '{mod.weight_name}' gives NaN or "
                f"Inf in {info.dtype}",
                hint="the adapter's delta overflows the base model's dtype",
            )
        for r0, r1 in restore_rows.get(mod.weight_name, ()):
            new[r0:r1] = w[r0:r1]  # PRE's bytes, not a float round trip
        yield info.file, to_bytes(new, info.dtype), info.start
    merged = {m.weight_name for m in mods}
    for name, key in adapter.saved.items():
        if name in merged:
            continue
        info = pre.info(name)
        yield info.file, to_bytes(value(key), info.dtype), info.start


def _pwrite(fds: dict[str, int], path: Path, data: bytes, offset: int) -> None:
    key = str(path)
    fd = fds.get(key)
    if fd is None:
        fd = fds[key] = os.open(path, os.O_WRONLY)
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
