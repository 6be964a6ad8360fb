"""qkrestore: restore the query/key routing of softmax-attention layers after CoT fine-tuning.

The Python API (see :mod:`qkrestore.api`)::

    import qkrestore

    result = qkrestore.merge("./base", "./sft", "./sft-qkrestore")
    report = qkrestore.verify("./sft-qkrestore")
    sweep = qkrestore.sweep("./base", "./sft", lengths=[4096], reasoning="example")
"""

from ._version import __version__
from .api import merge, pro, verify
from .api_eval import (
    RecipeNotWritten,
    attn_distance,
    attn_locality,
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
    "attn_locality",
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
