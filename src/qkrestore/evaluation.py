"""What ``sweep`` and ``select-layers`` measure on a loaded model: recall and reasoning.

Why one module: both commands evaluate many variants of one loaded model (see
:mod:`qkrestore.candidates`), so everything that depends only on the model's inputs (NIAH prompts,
tokenised items) is built once here and reused for every variant.

* **NIAH recall** uses the built-in RULER-style probe of :mod:`qkrestore.diagnostics.niah` (its
  prompts, depths and scorer), generating greedily on the loaded model.
* **Items** (``--reasoning FILE``, ``--recall FILE``): a JSONL file of ``{"prompt", "answer"}``
  objects, each field a string (tokenised with the model's tokenizer: the prompt as the tokenizer
  does by default, the answer with no special tokens) or a list of token ids (for models without a
  tokenizer). One forward pass over prompt + answer gives both metrics:

  - ``exact``: 1 when greedy decoding from the prompt reproduces the answer's tokens exactly,
    i.e. when the arg-max at every answer position is the answer's token (equal to running
    ``generate`` for that many tokens, barring exact ties of the top two logits);
  - ``loglik``: the mean over the answer's tokens of ``log p(token | prefix)``, natural log.

  The file's score is the mean of the items' scores. An optional ``"group"`` (or ``"length"``)
  field splits recall files into columns (``recall@GROUP``).
* **lm-evaluation-harness** (optional): named tasks through ``lm_eval.simple_evaluate`` on an
  ``HFLM`` wrapping the same loaded model.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .diagnostics.attention import forward_errors
from .diagnostics.niah import build_sample, sample_depths, score
from .errors import QKRestoreError
from .runtime import load_causal_lm, load_tokenizer

EXAMPLE_REASONING = "reasoning-example.jsonl"
LM_EVAL_INSTALL = 'pip install "qkrestore[eval]" (or: pip install "lm_eval>=0.4")'

Progress = Callable[[int], None]
# Logits per batch of scored items (padded tokens × vocabulary): 2**28 floats are 1 GiB in
# float32, so batching short items never costs more memory than that beyond one long item alone.
BATCH_LOGITS = 2**28
_MANAGERS: dict[tuple[Any, ...], Any] = {}  # lm-eval TaskManagers, built once per process


def example_reasoning_file() -> Path:
    """The shipped example ``--reasoning`` file (package data)."""
    return Path(str(resources.files("qkrestore") / "data" / EXAMPLE_REASONING))


# -- items ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One ``{prompt, answer}`` line: text, or token ids as tuples."""

    prompt: str | tuple[int, ...]
    answer: str | tuple[int, ...]
    group: str | None = None


def _field(value: Any, where: str, name: str) -> str | tuple[int, ...]:
    if isinstance(value, str) and value:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return tuple(value)
    raise QKRestoreError(
        f"{where}: '{name}' must be a non-empty string or a list of token ids (integers ≥ 0)"
    )


def load_items(path: Path, option: str) -> list[Item]:
    """Read a JSONL file of ``{prompt, answer[, group|length]}``; one clear line per problem."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise QKRestoreError(f"{option} {path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise QKRestoreError(f"{option} {path}: not UTF-8 text") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QKRestoreError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or "prompt" not in obj or "answer" not in obj:
            raise QKRestoreError(f"{where}: each line must be an object with 'prompt' and 'answer'")
        group = obj.get("group", obj.get("length"))
        items.append(
            Item(
                _field(obj["prompt"], where, "prompt"),
                _field(obj["answer"], where, "answer"),
                None if group is None else str(group),
            )
        )
    if not items:
        raise QKRestoreError(f"{option} {path}: no items")
    return items


def needs_tokenizer(items: Sequence[Item]) -> bool:
    return any(isinstance(x.prompt, str) or isinstance(x.answer, str) for x in items)


# -- the loaded model -----------------------------------------------------------------------------


def load_model(
    path: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> Any:
    """One causal LM from a local folder, on ``device`` in ``dtype``, in eval mode."""
    return load_causal_lm(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


@dataclass(frozen=True)
class NiahSettings:
    """The built-in probe's options (those of ``qkrestore niah``)."""

    lengths: tuple[int, ...]
    task: str = "single-2"
    samples: int = 10
    depth: float | None = None
    seed: int = 0
    max_new_tokens: int | None = None


class Runner:
    """Evaluates whatever weights the loaded model holds now; inputs are prepared once."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any | None,
        device: torch.device,
        *,
        autocast: bool,
        label: str,
        batch_size: int = 1,
    ) -> None:
        self.model = model
        self.batch_size = max(1, batch_size)
        self.tok = tokenizer
        self.device = device
        self.autocast = autocast and device.type == "cuda"
        self.label = label
        # id(items) → (items, encoded): the items are kept so that their id stays theirs
        self._encoded: dict[int, tuple[Sequence[Item], list[tuple[list[int], list[int]]]]] = {}
        self._niah: dict[NiahSettings, list[tuple[Any, int, float]]] = {}

    @classmethod
    def from_settings(cls, model: Any, tokenizer: Any | None, cfg: Any, label: str) -> Runner:
        """A runner with the measuring settings ``sweep`` and ``select-layers`` share (``device``,
        ``autocast``, ``batch_size`` of their configs)."""
        return cls(
            model,
            tokenizer,
            cfg.device,
            autocast=cfg.autocast,
            batch_size=cfg.batch_size,
            label=label,
        )

    @contextlib.contextmanager
    def context(self, tokens: int) -> Iterator[None]:
        """Inference mode, bf16 autocast on CUDA when asked, and one-line errors."""
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.autocast
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), amp, forward_errors(self.label, self.device, tokens):
            yield

    def _encode(self, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
        key = id(items)
        if key not in self._encoded:
            if needs_tokenizer(items) and self.tok is None:
                raise QKRestoreError(
                    f"{self.label}: text items need the model's tokenizer files",
                    hint="copy the tokenizer into the model folder, or give token ids",
                )
            out = []
            for x in items:
                p = (
                    list(x.prompt)
                    if isinstance(x.prompt, tuple)
                    else self.tok(x.prompt)["input_ids"]
                )
                a = (
                    list(x.answer)
                    if isinstance(x.answer, tuple)
                    else self.tok(x.answer, add_special_tokens=False)["input_ids"]
                )
                if not p or not a:
                    raise QKRestoreError(
                        f"item {len(out) + 1}: the prompt or answer tokenises to nothing"
                    )
                out.append((p, a))
            self._encoded[key] = (items, out)
        return self._encoded[key][1]

    def score_items(
        self, items: Sequence[Item], progress: Progress | None = None
    ) -> list[dict[str, Any]]:
        """Per item: ``exact`` (bool) and ``loglik`` (mean log-probability of the answer).

        Items are scored in batches of up to ``batch_size`` sequences of similar length, padded on
        the right, and of at most :data:`BATCH_LOGITS` logits (a long item runs alone). In a
        causal LM a position's logits depend only on the tokens before it, so the padding after an
        item cannot change its scores; only the kernels' summation order differs from one item at
        a time (float32 on CPU: ~1e-6; bf16 autocast: a tie may flip).
        """
        encoded = self._encode(items)
        rows: list[dict[str, Any]] = [{} for _ in encoded]
        # longest first, so that a batch that runs out of memory does so at once
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]) - len(encoded[i][1]))
        lengths = [len(p) + len(a) for p, a in encoded]
        cap = max(1, BATCH_LOGITS // _vocabulary(self.model))
        for batch in _batches(order, lengths, self.batch_size, cap):
            width = max(len(encoded[i][0]) + len(encoded[i][1]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = encoded[i][0] + encoded[i][1]
                ids[row, : len(seq)] = torch.tensor(seq)
            with self.context(width):
                logits = self.model(input_ids=ids.to(self.device)).logits
            for row, i in enumerate(batch):
                p, a = encoded[i]
                lg = logits[row, len(p) - 1 : len(p) + len(a) - 1].float()
                target = torch.tensor(a, device=lg.device)
                logp = torch.log_softmax(lg, -1).gather(1, target[:, None])[:, 0]
                rows[i] = {
                    "exact": bool((lg.argmax(-1) == target).all()),
                    "loglik": float(logp.mean()),
                    "tokens": len(a),
                }
            if progress:
                progress(len(batch))
        return rows

    def niah(self, s: NiahSettings, progress: Progress | None = None) -> dict[str, float]:
        """Accuracy per length of the built-in probe (prompts built once, reused)."""
        if self.tok is None:
            raise QKRestoreError(
                f"{self.label}: the NIAH probe needs the model's tokenizer files",
                hint="copy the tokenizer next to the model, or pass --recall FILE.jsonl "
                "with token-id prompts",
            )
        if s not in self._niah:
            tok = self.tok

            def encode(text: str) -> list[int]:
                return tok(text, add_special_tokens=False)["input_ids"]

            built = []
            for length in s.lengths:
                for i, d in enumerate(sample_depths(s.samples, s.depth)):
                    sample = build_sample(s.task, length, d, encode, seed=s.seed * 100_003 + i)
                    built.append((sample, length, d))
            self._niah[s] = built
        new_tokens = s.max_new_tokens or (48 if s.task == "single-3" else 24)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        hits = dict.fromkeys(s.lengths, 0)
        for sample, length, _ in self._niah[s]:
            enc = self.tok(sample.prompt, return_tensors="pt")
            ids = {
                k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")
            }
            with self.context(sample.tokens):
                out = self.model.generate(
                    **ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
                )
            answer = self.tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            hits[length] += score(answer, sample.needle.value)
            if progress:
                progress(1)
        return {str(n): hits[n] / s.samples for n in s.lengths}


def _vocabulary(model: Any) -> int:
    """Rows of the model's output layer (the logits' last dimension); 1 if it cannot be told."""
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, TypeError, IndexError):
        return int(getattr(getattr(model, "config", None), "vocab_size", None) or 1)


def _batches(
    order: Sequence[int], lengths: Sequence[int], size: int, max_tokens: int
) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (longest first) of at most ``size`` items and at most
    ``max_tokens`` padded tokens; an item longer than that forms a batch of its own."""
    batch: list[int] = []
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= size or (len(batch) + 1) * width > max_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def summarise_items(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The file's score: the mean of the items' exact match and of their mean log-likelihood."""
    n = len(rows)
    return {
        "exact": sum(r["exact"] for r in rows) / n,
        "loglik": sum(r["loglik"] for r in rows) / n,
        "items": n,
    }


def recall_by_group(items: Sequence[Item], rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Exact match per group of a ``--recall`` file (one group "all" when none is given)."""
    groups: dict[str, list[bool]] = {}
    for x, r in zip(items, rows):
        groups.setdefault(x.group or "all", []).append(r["exact"])
    return {g: sum(v) / len(v) for g, v in groups.items()}


def mean(values: Sequence[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


# -- lm-evaluation-harness ------------------------------------------------------------------------


def require_lm_eval() -> None:
    """Fail early, in one line, when the optional harness is missing."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise QKRestoreError(
            "--lm-eval needs lm-evaluation-harness, which is not installed",
            hint=LM_EVAL_INSTALL,
        ) from None


@dataclass(frozen=True)
class LmEvalSettings:
    """How the harness is run: tasks, and what its HF backend and RULER-style tasks need."""

    tasks: tuple[str, ...]
    tokenizer_path: str
    max_length: int | None = None
    lengths: tuple[int, ...] = ()
    batch_size: int = 1
    limit: float | None = None
    include_path: str | None = None
    metric: str | None = None


def run_lm_eval(
    model: Any, tokenizer: Any, device: torch.device, s: LmEvalSettings, autocast: bool
) -> dict[str, dict[str, float]]:
    """Run the harness's tasks on the loaded model; numeric metrics per task (no stderr).

    The model is wrapped in ``HFLM`` (``max_length`` as given, bf16 ``mixed_precision_dtype`` when
    autocasting on CUDA). Lengths go where RULER's task builders read them: the task metadata's
    ``max_seq_lengths``, with ``tokenizer`` naming the tokenizer folder they count with.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    kwargs: dict[str, Any] = {
        "pretrained": model,
        "tokenizer": tokenizer,
        "batch_size": s.batch_size,
        "device": str(device),
    }
    if s.max_length:
        kwargs["max_length"] = s.max_length
    if autocast and device.type == "cuda":
        kwargs["mixed_precision_dtype"] = torch.bfloat16
    lm = HFLM(**kwargs)
    meta: dict[str, Any] = {"tokenizer": s.tokenizer_path}
    if s.lengths:
        meta["max_seq_lengths"] = list(s.lengths)
    key = (s.include_path, s.tokenizer_path, tuple(s.lengths), tuple(s.tasks))
    manager = _MANAGERS.get(key)
    if manager is None:
        # Indexing the harness's thousands of built-in task files takes tens of seconds: do it
        # once per run, and not at all when the user's own folder holds every task asked for.
        manager = None
        if s.include_path:
            own = TaskManager(include_path=s.include_path, include_defaults=False, metadata=meta)
            manager = own if all(t in own.all_tasks for t in s.tasks) else None
        manager = manager or TaskManager(include_path=s.include_path, metadata=meta)
        _MANAGERS[key] = manager
    try:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(s.tasks),
            limit=s.limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
    except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QKRestoreError(
            f"--lm-eval {','.join(s.tasks)}: the harness failed ({first[:200]})",
            hint="check the task names (lm_eval --tasks list); tasks that download data need the "
            "network or a prefetched HF_DATASETS_CACHE",
        ) from None
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (res or {}).get("results", {}).items():
        # metrics are named "metric,filter" (e.g. "acc,none", "4096,none" for RULER lengths);
        # bookkeeping such as "alias" or "sample_len" has no filter part
        out[task] = {
            k: float(v)
            for k, v in metrics.items()
            if "," in k
            and "stderr" not in k
            and isinstance(v, (int, float))
            and not isinstance(v, bool)
        }
    return out


def lm_eval_score(results: dict[str, dict[str, float]], metric: str | None) -> float | None:
    """One number for a candidate: the mean over tasks of the mean of each task's metrics (only
    those named ``metric`` before the filter suffix, e.g. ``acc`` in ``acc,none``, when given)."""
    per_task = []
    for vals in results.values():
        picked = [v for k, v in vals.items() if metric is None or k.split(",")[0] == metric]
        if picked:
            per_task.append(sum(picked) / len(picked))
    return mean(per_task)


__all__ = [
    "EXAMPLE_REASONING",
    "Item",
    "LmEvalSettings",
    "NiahSettings",
    "Runner",
    "example_reasoning_file",
    "lm_eval_score",
    "load_items",
    "load_model",
    "load_tokenizer",
    "recall_by_group",
    "require_lm_eval",
    "run_lm_eval",
    "summarise_items",
]
