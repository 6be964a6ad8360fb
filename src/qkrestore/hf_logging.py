"""Keep transformers' own output (progress bars, kernel-fallback notices) out of the tool's output.

Every place that loads a model or tokenizer with transformers calls :func:`quiet_transformers`
first, so ``--json`` stdout and one-line errors stay clean.
"""

from __future__ import annotations


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
