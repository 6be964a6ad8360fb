"""qkrestore: restore the query/key routing of softmax-attention layers after CoT fine-tuning.

The Python API (see :mod:`qkrestore.api`)::

    import qkrestore

    result = qkrestore.merge("./base", "./sft", "./sft-qkrestore")
    report = qkrestore.verify("./sft-qkrestore")
    sweep = qkrestore.sweep("./base", "./sft", lengths=[4096], reasoning="example")
"""

import sys as _sys
import types as _types

from ._version import __version__
from .api import merge, pro, verify
from .api_eval import (
    RecipeNotWritten,
    attn_distance,
    autocorr,
    drift,
    inspect_layers,
    niah,
    push,
    select_layers,
    sweep,
)
from .errors import (
    CheckpointError,
    ConfigError,
    OutputError,
    PlanError,
    QKRestoreError,
    VerifyError,
)

__all__ = [
    "CheckpointError",
    "ConfigError",
    "OutputError",
    "PlanError",
    "QKRestoreError",
    "RecipeNotWritten",
    "VerifyError",
    "__version__",
    "attn_distance",
    "autocorr",
    "drift",
    "inspect_layers",
    "merge",
    "niah",
    "pro",
    "push",
    "select_layers",
    "sweep",
    "verify",
]


class _Package(_types.ModuleType):
    """The package, keeping its API functions when a submodule of the same name is imported.

    ``qkrestore.sweep`` and ``qkrestore.select_layers`` are API functions, and also (until the
    modules move into a subpackage) the names of the modules behind them: importing such a module
    would make Python set the package attribute to the module, shadowing the function. The modules
    stay reachable through ``sys.modules`` and ``from qkrestore.sweep import ...``.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _SHADOWED and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_SHADOWED = frozenset({"sweep", "select_layers"})
_sys.modules[__name__].__class__ = _Package
