"""``adapter_config.json`` of a PEFT LoRA/DoRA adapter, read with peft's own matching rules.

Which modules an adapter targets, and with which rank and scale, is decided by peft from the config
and the module's name. The rules are repeated here (not imported: a plain merge must not need peft)
and pinned to peft's source, ``peft/tuners/tuners_utils.py::check_target_module_exists`` and
``peft/utils/other.py::get_pattern_key`` (peft 0.21), so that planning agrees with what peft loads:

* ``target_modules`` as a string is a regular expression matched with ``re.fullmatch`` against the
  module's full name; as a list, a name matches if it equals an entry or ends with ``.<entry>``;
  ``layers_to_transform``/``layers_pattern`` then narrow list matches to some layer indices.
* ``exclude_modules`` (peft ≥ 0.14) has the same string/list forms and wins over targets.
* ``rank_pattern``/``alpha_pattern`` keys match when ``re.match(rf"(.*\\.)?({key})$", name)``; the
  first matching key (in the file's order) gives the module's ``r``/``lora_alpha``.
* The scale of a module is ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..io.checkpoint import JSON_ERRORS
from ..io.sourcefiles import checked_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Keys peft writes for features whose merged weight is not W + s·B·A (or is not a weight at all):
# planning rows of such an adapter would not describe what peft does with it. Each is refused by
# its own name with its own reason (peft 0.21, peft/tuners/lora/config.py and variants.py).
UNSUPPORTED_FEATURES = {
    "lora_bias": "a bias on lora_B",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA): its delta applies only after the "
    "invocation tokens, so no merged weight describes it",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers",
    "kasa_config": "KaSA: it truncates the base weight's smallest singular components and puts a "
    "learned diagonal (lora_diag) between lora_A and lora_B, so POST is not PRE + s·B·A",
    "use_bdlora": "BD-LoRA: lora_A or lora_B is block-diagonal, stored as blocks, so the delta is "
    "not the product of the saved factors",
    "arrow_config": "Arrow routing: a per-token mixture of several LoRA experts, which peft "
    "cannot merge into one weight",
    "monteclora_config": "MonteCLoRA: peft's forward samples the factors (extra variance "
    "parameters act on every output row), so rows planned on B·A do not describe the adapter",
}
# init_lora_weights values that change the *base* weights at initialisation (PiSSA/OLoRA/CorDA
# subtract the initial delta from W, LoftQ quantises it): such an adapter belongs to that changed
# base, not to PRE, unless peft converted it at save time (which writes init_lora_weights=true).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# Every field of peft 0.21's LoraConfig (and PeftConfig). A key outside this set is an option of
# another peft release whose effect on the merged weight is unknown: refused by name, not ignored.
KNOWN_KEYS = frozenset(
    [
        "alora_invocation_tokens",
        "alpha_pattern",
        "arrow_config",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "monteclora_config",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "runtime_config",
        "target_modules",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_bdlora",
        "use_dora",
        "use_qalora",
        "use_rslora",
        "velora_config",
    ]
)


@dataclass(frozen=True)
class AdapterConfig:
    """The parts of ``adapter_config.json`` that decide which weights change, and by how much."""

    path: Path
    raw: dict[str, Any]
    base_model: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    use_dora: bool
    target_modules: str | tuple[str, ...] | None
    exclude_modules: str | tuple[str, ...] | None
    layers_to_transform: int | tuple[int, ...] | None
    layers_pattern: tuple[str, ...] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    modules_to_save: tuple[str, ...]

    # -- peft's matching rules --------------------------------------------------------------------

    def excluded(self, name: str) -> bool:
        return _matches_list_or_regex(self.exclude_modules, name)

    def in_modules_to_save(self, name: str) -> bool:
        return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in self.modules_to_save)

    def targets(self, name: str) -> bool:
        """Whether peft puts a LoRA layer on the module called ``name`` (its full dotted name)."""
        if self.excluded(name) or self.in_modules_to_save(name):
            return False
        t = self.target_modules
        if t is None:
            return False
        if isinstance(t, str):
            return re.fullmatch(t, name) is not None
        if name in t:
            return True
        if not any(name.endswith(f".{k}") for k in t):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == ():
            return True
        index = layer_index(name, self.layers_pattern)
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha)
        return int(r), float(alpha)

    def scaling(self, name: str) -> float:
        """``s`` in ``ΔW = s·B·A`` for this module (peft's ``LoraLayer.update_layer``)."""
        r, alpha = self.rank_and_alpha(name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def layer_index(name: str, layers_pattern: Sequence[str] | None) -> int | None:
    """The layer index peft reads from a module name (the first numbered segment)."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in layers_pattern:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def _pattern_key(patterns: dict[str, Any], name: str) -> str:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


def _matches_list_or_regex(value: str | tuple[str, ...] | None, name: str) -> bool:
    if not value:
        return False
    if isinstance(value, str):
        return re.fullmatch(value, name) is not None
    return name in value or any(name.endswith(f".{k}") for k in value)


# -- reading ---------------------------------------------------------------------------------------


def is_adapter_folder(path: str | Path) -> bool:
    """A folder holding ``adapter_config.json`` (PEFT's marker) rather than ``config.json``."""
    p = Path(path)
    # lexists, not is_file: an adapter_config.json that is a FIFO, a folder or a link leading out
    # is still the adapter's marker, and is refused as such (not reported as "config.json: missing").
    return p.is_dir() and os.path.lexists(p / CONFIG_NAME)


def read_adapter_config(folder: Path) -> AdapterConfig:
    """Parse and check ``adapter_config.json``; refuse anything whose merge is not LoRA's."""
    path = checked_file(folder, CONFIG_NAME)  # never a FIFO or a link leading out of the folder
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing (a PEFT adapter folder needs it)") from None
    except JSON_ERRORS as exc:
        raise ConfigError(f"{path}: not valid JSON ({str(exc)[:120]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must hold a JSON object")
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ConfigError(
            f"{path}: peft_type {raw.get('peft_type')!r} is not supported (only LORA, with or "
            "without DoRA)",
            hint="IA³, LoHa, LoKr and prompt/prefix tuning change the model differently; merge "
            "them with peft first and pass the merged checkpoint as POST",
        )
    _refuse_variants(raw, path)
    if raw.get("bias", "none") != "none":
        raise ConfigError(
            f"{path}: bias={raw['bias']!r} trains the base layers' biases, which is not supported",
            hint="merge the adapter with peft and pass the merged checkpoint as POST",
        )
    return AdapterConfig(
        path=path,
        raw=raw,
        base_model=raw.get("base_model_name_or_path") or None,
        r=_positive_int(raw.get("r", 8), "r", path),
        lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", path),
        use_rslora=_flag(raw.get("use_rslora"), "use_rslora", path),
        use_dora=_flag(raw.get("use_dora"), "use_dora", path),
        target_modules=_str_or_list(raw.get("target_modules"), "target_modules", path),
        exclude_modules=_str_or_list(raw.get("exclude_modules"), "exclude_modules", path),
        layers_to_transform=_layers(raw.get("layers_to_transform"), path),
        layers_pattern=_pattern_list(raw.get("layers_pattern"), path),
        rank_pattern={
            str(k): _positive_int(v, f"rank_pattern[{k!r}]", path)
            for k, v in _dict(raw.get("rank_pattern"), "rank_pattern", path).items()
        },
        alpha_pattern={
            str(k): _number(v, f"alpha_pattern[{k!r}]", path)
            for k, v in _dict(raw.get("alpha_pattern"), "alpha_pattern", path).items()
        },
        modules_to_save=tuple(
            _str_or_list(raw.get("modules_to_save"), "modules_to_save", path, regex=False) or ()
        ),
    )


def _refuse_variants(raw: dict[str, Any], path: Path) -> None:
    """Refuse, by name and with its reason, every LoRA variant whose merge is not W + s·B·A.

    VeLoRA (``velora_config``, a different backward pass only) and MiCA (``init_lora_weights:
    "mica"``, a different initialisation only) merge as plain LoRA in peft 0.21 and are accepted.
    """
    merge_hint = (
        "merge the adapter with peft's merge_and_unload and pass the merged checkpoint as POST"
    )
    for key, what in UNSUPPORTED_FEATURES.items():
        if raw.get(key):
            raise ConfigError(
                f"{path}: {what} ({key}={_short(raw[key])}) is not supported", hint=merge_hint
            )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ConfigError(
            f"{path}: init_lora_weights={init!r} changed the base weights when training started, "
            "so the adapter belongs to that changed base, not to PRE",
            hint="save it again with peft's path_initial_model_for_weight_conversion (a plain "
            "LoRA of the original base), or merge it with peft and pass the merged checkpoint",
        )
    unknown = sorted(k for k, v in raw.items() if k not in KNOWN_KEYS and v)
    if unknown:
        raise ConfigError(
            f"{path}: unknown LoRA option {unknown[0]}={_short(raw[unknown[0]])} (from a peft "
            "release newer than 0.21?): its effect on the merged weight is not known",
            hint=merge_hint,
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_int(value: Any, key: str, path: Path) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{path}: '{key}' must be a positive integer, not {value!r}")
    return value


def _flag(value: Any, key: str, path: Path) -> bool:
    """A boolean option: true, false or absent (null). A string such as "no" is truthy in Python
    and would silently switch the option on, so anything else is refused."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: '{key}' must be true or false, not {_short(value)}")
    return value


def _number(value: Any, key: str, path: Path) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{path}: '{key}' must be a number, not {value!r}")
    return float(value)


def _dict(value: Any, key: str, path: Path) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: '{key}' must be an object")
    return value


def _str_or_list(
    value: Any, key: str, path: Path, *, regex: bool = True
) -> str | tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not regex:
            return (value,)
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(
                f"{path}: '{key}' {value!r} is not a regular expression ({exc})"
            ) from None
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{path}: '{key}' must be a string or a list of strings")


def _layers(value: Any, path: Path) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return tuple(value)
    raise ConfigError(f"{path}: 'layers_to_transform' must be an integer or a list of integers")


def _pattern_list(value: Any, path: Path) -> tuple[str, ...] | None:
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"{path}: 'layers_pattern' must be a string or a list of strings")
