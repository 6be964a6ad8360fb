"""The ``niah`` command's loop: build the probe's prompts once per length and score them in
batches with the scoring engine.

Apart from :mod:`.niah` (prompts, needles, the verdict rules), because it drives the
:class:`~qkrestore.evaluate.runner.Runner`, which itself builds on those prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..errors import QKRestoreError
from ..io.runtime import load_causal_lm, load_tokenizer
from .niah import check_lengths, context_length, context_notes, read_config
from .runner import NiahSettings, Runner


def run_niah(
    model_dir: Path,
    lengths: Sequence[int],
    task: str,
    samples: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    depth: float | None = None,
    max_new_tokens: int | None = None,
    use_chat_template: bool = False,
    seed: int = 0,
    trust_remote_code: bool = False,
    scoring: str = "forced",
    beyond_context: bool = False,
    device_map: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score every (length, sample) prompt; the ``niah`` JSON document.

    Prompts of one length are scored in batches (:class:`qkrestore.evaluate.runner.Runner`), by one
    teacher-forced pass (``scoring="forced"``, see :func:`forced_verdict`) or by greedy generation
    of ``max_new_tokens`` tokens (``"generate"``, the rule of earlier versions).
    """
    config = read_config(model_dir)
    context = context_length(config)
    check_lengths(lengths, context, beyond_context=beyond_context, where=str(model_dir))
    settings = NiahSettings(
        lengths=tuple(lengths),
        task=task,
        samples=samples,
        depth=depth,
        seed=seed,
        max_new_tokens=max_new_tokens,
        chat_template=use_chat_template,
        scoring=scoring,
        beyond_context=beyond_context,
    )
    tok = load_tokenizer(model_dir, what="niah")
    if use_chat_template and not getattr(tok, "chat_template", None):
        raise QKRestoreError(f"{model_dir}: --chat-template, but the tokenizer has none")
    model = load_causal_lm(
        model_dir,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        device_map=device_map,
    )
    runner = Runner(model, tok, device, autocast=False, label=str(model_dir))
    new_tokens = settings.new_tokens()
    rows = []
    records = []
    t_build = time.perf_counter()
    runner.niah_prompts(settings)  # every length's prompts in one lock-step build, on every core
    build_seconds = time.perf_counter() - t_build
    for length in lengths:
        t0 = time.perf_counter()
        one = replace(settings, lengths=(length,))
        done = [0]

        def tick(n: int, length: int = length, done: list[int] = done) -> None:
            done[0] += n
            if progress:
                progress(f"length {length}: {done[0]}/{samples} scored")

        got = runner.niah_records(one, tick)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        hits = sum(r["correct"] for r in got)
        records.extend(got)
        rows.append(
            {
                "length": length,
                "accuracy": hits / samples if samples else None,
                "correct": hits,
                "samples": samples,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return {
        "model": str(model_dir),
        "task": task,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "device_map": device_map,
        "scoring": scoring,
        "max_new_tokens": new_tokens,
        "results": rows,  # seconds: scoring one length's prompts, built beforehand
        "prompts_seconds": round(build_seconds, 3),
        "samples": records,
        "notes": context_notes(lengths, context, new_tokens),
        "reference": "for official numbers use lm-evaluation-harness's RULER tasks (niah_single_1/2/3)",
    }
