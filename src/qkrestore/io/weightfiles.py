"""Which weight files of a folder the loader reads, and which other weight files lie beside them.

The tool must act on the files transformers' ``from_pretrained`` would load, not on the ones it
happens to find first: a folder that holds both ``model.safetensors`` and a sharded index (what a
re-save with another shard size leaves behind) is loaded from the single file, so restoring the
shards and copying the single file over would give a model whose attention is still POST's.

The precedence below is transformers' own for a local folder (``_get_resolved_checkpoint_files``
in ``transformers/modeling_utils.py``, 5.x, with no ``variant`` and ``use_safetensors`` unset):

1. the file named by the config's ``transformers_weights`` (a ``.safetensors`` file or index);
2. ``model.safetensors``;
3. ``model.safetensors.index.json`` (shards: the distinct values of its ``weight_map``);
4. ``pytorch_model.bin`` / ``pytorch_model.bin.index.json`` (pickle: never opened by qkrestore).

Variants (``model.fp16.safetensors``, ``model.safetensors.index.fp16.json``, shards
``model.fp16-00001-of-00002.safetensors``) are read only when a caller passes ``variant=``; the
Mistral-format ``consolidated*.safetensors`` and remote-code or other-framework files (``*.bin``,
``*.pt``, ``*.gguf``, ...) are never read by ``from_pretrained``. They all still hold unrestored
weights, so none of them is carried into an output.

This module is the one home of the list of those other formats (the writer skips them, the Hub
download ignores them). It only lists and decides; reading headers is :mod:`qkrestore.io.checkpoint`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHT_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
# Weight formats other than safetensors: never read, never copied (they would carry POST's
# unrestored weights into OUT), never downloaded for POST.
OTHER_FORMAT_SUFFIXES = (".bin", ".pth", ".pt", ".gguf", ".ckpt", ".h5", ".msgpack")
# Mistral's own format (``consolidated.safetensors`` + ``params.json``), read by vLLM's and
# mistral-inference's loaders but not by transformers'.
OTHER_FORMAT_PREFIXES = ("consolidated",)
# The same list as Hub ``ignore_patterns`` (fnmatch), for ``snapshot_download``.
OTHER_FORMAT_PATTERNS = [f"*{s}" for s in OTHER_FORMAT_SUFFIXES] + [
    f"{p}*" for p in OTHER_FORMAT_PREFIXES
]

# model.<variant>.safetensors and model.safetensors.index.<variant>.json (transformers' _add_variant)
_VARIANT_SINGLE = re.compile(r"^model\.(?P<v>[^/]+)\.safetensors$")
_VARIANT_INDEX = re.compile(r"^model\.safetensors\.index\.(?P<v>[^/]+)\.json$")


def is_other_format(name: str) -> bool:
    """A weight file in a format the tool never reads or copies (by its base name)."""
    base = PurePosixPath(name).name
    return base.endswith(OTHER_FORMAT_SUFFIXES) or base.startswith(OTHER_FORMAT_PREFIXES)


def is_weight_file(name: str) -> bool:
    """Any file that holds (or indexes) weights: safetensors, their indexes, other formats."""
    base = PurePosixPath(name).name
    return (
        base.endswith(".safetensors")
        or (".safetensors.index" in base and base.endswith(".json"))
        or base == "pytorch_model.bin.index.json"
        or is_other_format(base)
    )


def is_entry_name(name: str) -> bool:
    """A name ``from_pretrained`` can open as a whole weight set (a file or an index)."""
    return name.endswith(".safetensors") or name.endswith(".safetensors.index.json")


@dataclass(frozen=True)
class LoaderView:
    """The weight set a loader reads from a folder, and why.

    ``entry`` is the file the loader opens (a single safetensors file or an index); ``rivals`` are
    other whole safetensors weight sets a plain ``from_pretrained`` could read instead in a slightly
    different folder or call (the single file beside the index, the config's ``transformers_weights``
    target beside the default); ``variants`` are the ``variant=`` sets, read only on request.
    """

    entry: str
    reason: str
    chosen_by: str  # "loader" (transformers' precedence) or "option" (the user named the set)
    rivals: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()

    @property
    def sharded(self) -> bool:
        return self.entry.endswith(".json")


def explicit_weights(config: dict[str, Any]) -> str | None:
    """The config's ``transformers_weights`` file name, if it names a safetensors file or index."""
    value = config.get("transformers_weights")
    if isinstance(value, str) and is_entry_name(value):
        return value
    return None


def entries_present(root: Path, config: dict[str, Any]) -> list[str]:
    """Every default (non-variant) weight-set entry in the folder, in the loader's order."""
    out: list[str] = []
    explicit = explicit_weights(config)
    if explicit and (root / explicit).is_file():
        out.append(explicit)
    for name in (SINGLE_NAME, INDEX_NAME):
        if name not in out and (root / name).is_file():
            out.append(name)
    return out


def variant_entries(root: Path) -> list[str]:
    """``model.<v>.safetensors`` and ``model.safetensors.index.<v>.json`` files, sorted."""
    try:
        names = sorted(p.name for p in root.iterdir())
    except OSError:
        return []
    return [n for n in names if _VARIANT_SINGLE.match(n) or _VARIANT_INDEX.match(n)]


def loader_view(root: Path, config: dict[str, Any], chosen: str | None = None) -> LoaderView | None:
    """The set the loader reads (or the one ``chosen`` names); ``None`` when no safetensors set exists.

    ``chosen`` must be one of the entries present (checked by the caller, which knows how to say
    so); the other entries become rivals either way.
    """
    entries = entries_present(root, config)
    variants = tuple(variant_entries(root))
    if chosen is not None:
        rivals = tuple(e for e in entries if e != chosen)
        return LoaderView(chosen, "named by the user", "option", rivals, variants)
    if not entries:
        return None
    first = entries[0]
    if first == explicit_weights(config):
        reason = "named by config.json's transformers_weights"
    elif first == SINGLE_NAME and INDEX_NAME in entries:
        reason = f"transformers reads {SINGLE_NAME} before {INDEX_NAME}"
    elif first == SINGLE_NAME:
        reason = "single file"
    else:
        reason = "sharded index"
    return LoaderView(first, reason, "loader", tuple(entries[1:]), variants)


def pickle_files(root: Path) -> list[str]:
    """Pickle checkpoints in the folder (reported, never opened: unpickling runs code)."""
    found = [n for n in PICKLE_WEIGHT_NAMES if (root / n).exists()]
    return found + sorted(p.name for p in root.glob("pytorch_model-*.bin"))
