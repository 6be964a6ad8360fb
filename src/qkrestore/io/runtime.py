"""The edge between qkrestore and the libraries that run models: devices, and loading with transformers.

Everything that puts weights on a device or asks transformers for a model or a tokenizer goes
through here, so that device policy (``auto`` prefers CUDA, an explicit ``cuda`` without a GPU is an
error, not a silent CPU fallback), quiet logging and the one-line error for a model that does not
load are decided once. torch and transformers are imported inside the functions: commands that only
copy bytes never pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ..errors import QKRestoreError
from .checkpoint import refuse_adapter

if TYPE_CHECKING:
    import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def quiet_transformers() -> None:
    """Keep transformers' own output (progress bars, kernel notices) out of ours.

    Called before every load, so ``--json`` stdout and one-line errors stay clean.
    """
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a usable ``torch.device``.

    ``auto`` picks CUDA when one is usable, so a GPU box gets the fast path without a flag. Asking
    for CUDA explicitly without one is an error (``ValueError``) rather than a silent CPU fallback: a
    70B solve on the CPU takes minutes instead of seconds, and the user should know why.
    """
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu' or 'cuda'") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"unsupported device {device!r}; expected 'auto', 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} was requested but no CUDA GPU is usable "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "use device 'cpu' or 'auto'"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} was requested but only {torch.cuda.device_count()} "
            "CUDA device(s) are visible"
        )
    return dev


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """The dtype of QK-Pro's linear algebra: float64 on the CPU, float32 on CUDA.

    GPUs run float64 at a small fraction of their float32 rate, and float32 is far more precise than
    the bf16/fp16 weights the result is cast to.
    """
    import torch

    return torch.float32 if device.type == "cuda" else torch.float64


def model_dtype_for(device: torch.device, name: str = "auto") -> torch.dtype:
    """The dtype a model is run in: ``auto`` is bfloat16 on CUDA and float32 on the CPU."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def choose_device(device: str, dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """``--device`` and ``--dtype`` as the commands that run a model take them."""
    try:
        dev = resolve_device(device)
    except ValueError as exc:
        raise QKRestoreError(f"--device {device}: {exc}") from None
    return dev, model_dtype_for(dev, dtype)


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def load_causal_lm(
    path: Path | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: Path | str | None = None,
) -> Any:
    """A causal LM from a local folder, in eval mode on ``device``; one clear line if it won't load.

    ``attn_implementation="eager"`` is what the attention diagnostics need (the only implementation
    that returns attention weights); otherwise transformers' default (SDPA, which runs flash or
    memory-efficient kernels) is kept.

    ``device_map`` (``"auto"``, or accelerate's per-module dict) spreads a model too large for one
    device over the GPUs, then the CPU (and ``offload_folder`` on disk), as accelerate's
    ``infer_auto_device_map`` decides within ``max_memory``; the model then stays where it was
    put (no ``.to(device)``) and inputs go to its input embedding's device.
    """
    from transformers import AutoModelForCausalLM

    refuse_adapter(Path(path))
    quiet_transformers()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        try:
            import accelerate  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            raise QKRestoreError(
                f"--device-map {device_map}: needs accelerate, which is not installed",
                hint="pip install accelerate",
            ) from None
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise QKRestoreError(
            f"{path}: transformers could not load the model ({_first_line(exc)})"
        ) from None
    if device_map is None:
        model = cast(Any, model).to(device)
    return model.eval()


def has_causal_lm_class(model_type: object) -> bool:
    """Whether transformers itself (no remote code) has a causal-LM class for ``model_type``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def load_tokenizer(path: Path | str, *, what: str = "the model") -> Any:
    """The tokenizer saved in a local folder (never a download); one clear line when there is none."""
    from transformers import AutoTokenizer

    quiet_transformers()
    folder = Path(path)
    if not folder.is_dir():
        raise QKRestoreError(f"{path}: not a folder (a local tokenizer folder is needed)")
    refuse_adapter(folder)
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise QKRestoreError(
            f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json) there; "
            f"{what} needs the model's own tokenizer",
            hint="copy the tokenizer files of the base model into the folder",
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QKRestoreError(
            f"{path}: the tokenizer does not load ({_first_line(exc, 160)})"
        ) from None


@contextmanager
def forward_errors(path: Path | str, device: torch.device, tokens: int) -> Iterator[None]:
    """A failing forward pass (out of memory, a kernel that refuses the shapes) is the model's or
    the machine's problem, not a bug of the tool: one line that says where, and what to try."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise QKRestoreError(
            f"{path}: out of GPU memory on {tokens} tokens",
            hint="eager attention keeps one layer's N×N weights; try a smaller --length",
        ) from None
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QKRestoreError(
            f"{path}: the model's forward pass failed on {device} ({first[:200]})",
            hint="rerun with --debug for the traceback; --device cpu may work where a GPU kernel "
            "refuses the model's shapes",
        ) from exc
