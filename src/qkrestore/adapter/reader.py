"""A PEFT LoRA adapter folder: its config and the tensors of ``adapter_model.safetensors``.

The weights file gets exactly the header checks a checkpoint shard gets
(:func:`qkrestore.io.checkpoint.read_header`: offsets inside the file, sizes matching dtype and shape,
no overlaps), and its bytes are read lazily with ``pread`` through a :class:`Checkpoint` view.

peft saves (``peft/utils/save_and_load.py::get_peft_model_state_dict``, peft 0.21) one key per
adapter parameter under ``base_model.model.<module>``: ``lora_A.weight`` ``[r, in]``,
``lora_B.weight`` ``[out, r]``, DoRA's ``lora_magnitude_vector`` ``[out]`` (``….weight`` in older
releases), an embedding's ``lora_embedding_A`` ``[r, num_embeddings]`` and ``lora_embedding_B``
``[dim, r]``; and the full parameters of ``modules_to_save`` under their own names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..io.checkpoint import Checkpoint, TensorInfo, read_header
from ..io.sourcefiles import checked_file
from .config import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig, read_adapter_config

KEY_PREFIX = "base_model.model."
BASE_LAYER = ".base_layer.weight"
LINEAR, EMBEDDING = "linear", "embedding"
# Adapter-parameter suffixes → (layer kind, slot).
SUFFIXES: dict[str, tuple[str, str]] = {
    ".lora_A.weight": (LINEAR, "a"),
    ".lora_B.weight": (LINEAR, "b"),
    ".lora_magnitude_vector": (LINEAR, "m"),
    ".lora_magnitude_vector.weight": (LINEAR, "m"),
    ".lora_embedding_A": (EMBEDDING, "a"),
    ".lora_embedding_B": (EMBEDDING, "b"),
}


@dataclass(frozen=True)
class LoraModule:
    """One module's low-rank factors: ``ΔW = scaling · B · A`` (transposed for embeddings)."""

    name: str  # the module's full name in the model, e.g. model.layers.3.self_attn.q_proj
    kind: str  # LINEAR | EMBEDDING
    a: TensorInfo
    b: TensorInfo
    magnitude: TensorInfo | None
    scaling: float

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def delta_shape(self) -> tuple[int, int]:
        """Shape of the base weight the delta is added to."""
        if self.kind == EMBEDDING:
            return (self.a.shape[1], self.b.shape[0])
        return (self.b.shape[0], self.a.shape[1])

    def keys(self) -> list[str]:
        return [t.name for t in (self.a, self.b, self.magnitude) if t is not None]


@dataclass
class LoraAdapter:
    """An opened adapter folder; ``weights`` reads ``adapter_model.safetensors`` lazily."""

    root: Path
    config: AdapterConfig
    weights: Checkpoint
    modules: dict[str, LoraModule]
    saved: dict[str, str]  # base parameter name → adapter key (modules_to_save, saved embeddings)

    @property
    def file(self) -> Path:
        return self.root / WEIGHTS_NAME

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_adapter(root: str | Path) -> LoraAdapter:
    """Open and check an adapter folder: config, weights header, and one entry per module."""
    root = Path(root)
    # The two files read here pass the untrusted-folder rules first (a FIFO is never opened).
    checked_file(root, CONFIG_NAME)
    checked_file(root, WEIGHTS_NAME)
    if not (root / CONFIG_NAME).is_file():
        raise CheckpointError(f"{root}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    config = read_adapter_config(root)
    path = root / WEIGHTS_NAME
    if not path.is_file():
        if (root / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{root / 'adapter_model.bin'}: pickle adapters are never loaded (unpickling runs "
                "code)",
                hint="save it again with peft's save_pretrained(safe_serialization=True)",
            )
        raise CheckpointError(f"{path}: missing")
    shard, infos = read_header(path, WEIGHTS_NAME)
    tensors = {t.name: t for t in infos}
    weights = Checkpoint(
        root=root, config={}, shards={WEIGHTS_NAME: shard}, tensors=tensors, index=None
    )
    parts: dict[str, dict[str, TensorInfo]] = {}
    kinds: dict[str, str] = {}
    saved: dict[str, str] = {}
    base_layers: set[str] = set()
    for key, info in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise CheckpointError(
                f"{path}: tensor '{key}' does not start with '{KEY_PREFIX}' (not a PEFT LoRA save)"
            )
        rest = key[len(KEY_PREFIX) :]
        for suffix, (kind, slot) in SUFFIXES.items():
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                if kinds.setdefault(module, kind) != kind or slot in parts.get(module, {}):
                    raise CheckpointError(f"{path}: module '{module}' has conflicting LoRA tensors")
                parts.setdefault(module, {})[slot] = info
                break
        else:
            if ".lora_" in rest:
                raise CheckpointError(f"{path}: tensor '{key}' is no LoRA parameter peft writes")
            if rest.endswith(BASE_LAYER):
                # peft's save_embedding_layers: a targeted embedding's full weight, which replaces
                # the base model's on load (the LoRA delta is then added to it).
                rest = rest.removesuffix(BASE_LAYER) + ".weight"
                base_layers.add(rest)
            saved[rest] = key
    modules: dict[str, LoraModule] = {}
    for module, slots in sorted(parts.items()):
        modules[module] = _module(path, config, module, kinds[module], slots)
    for name in saved:
        owner = name.rsplit(".", 1)[0]
        if name in base_layers:
            if owner not in modules:
                raise CheckpointError(
                    f"{path}: tensor '{saved[name]}' is a saved base layer of '{owner}', which has "
                    "no LoRA factors"
                )
            continue
        if not config.in_modules_to_save(owner):
            raise CheckpointError(
                f"{path}: tensor '{saved[name]}' is neither a LoRA factor nor part of "
                f"modules_to_save {list(config.modules_to_save)}"
            )
    if not modules and not saved:
        raise CheckpointError(f"{path}: holds no LoRA tensors")
    return LoraAdapter(root=root, config=config, weights=weights, modules=modules, saved=saved)


def _module(
    path: Path, config: AdapterConfig, name: str, kind: str, slots: dict[str, TensorInfo]
) -> LoraModule:
    a, b, m = slots.get("a"), slots.get("b"), slots.get("m")
    if a is None or b is None:
        raise CheckpointError(
            f"{path}: module '{name}' has lora_{'A' if a is None else 'B'} missing"
        )
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise CheckpointError(
            f"{path}: module '{name}': lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
            "multiply"
        )
    if m is not None and (kind != LINEAR or m.shape != (b.shape[0],)):
        raise CheckpointError(
            f"{path}: module '{name}': lora_magnitude_vector {list(m.shape)} should be "
            f"[{b.shape[0]}]"
        )
    if m is None and config.use_dora and kind == LINEAR:
        raise CheckpointError(f"{path}: use_dora is set but '{name}' has no lora_magnitude_vector")
    if not config.targets(name):
        raise CheckpointError(
            f"{path}: module '{name}' has LoRA weights but adapter_config.json's target_modules "
            f"{_show(config.target_modules)} does not select it",
            hint="the config and the weights do not belong together",
        )
    r, _ = config.rank_and_alpha(name)
    if r != a.shape[0]:
        raise CheckpointError(
            f"{path}: module '{name}' has rank {a.shape[0]} but adapter_config.json gives r={r} "
            "(r / rank_pattern)"
        )
    for t in (a, b, *([m] if m is not None else [])):
        if not t.dtype.startswith(("F", "BF")) or t.dtype.startswith("F8"):
            raise CheckpointError(f"{path}: tensor '{t.name}' is {t.dtype}, not a float dtype")
    return LoraModule(name, kind, a, b, m, config.scaling(name))


def _show(value: object) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) < 80 else text[:77] + "…"
