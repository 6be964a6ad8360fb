"""qkrestore: restore the query/key routing of softmax-attention layers after CoT fine-tuning.

The Python API (see :mod:`qkrestore.api`)::

    import qkrestore

    result = qkrestore.merge("./base", "./sft", "./sft-qkrestore")
    report = qkrestore.verify("./sft-qkrestore")
"""

from ._version import __version__
from .api import inspect_layers, merge, pro, verify
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
    "VerifyError",
    "__version__",
    "inspect_layers",
    "merge",
    "pro",
    "verify",
]
