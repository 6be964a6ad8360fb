"""What ``sweep`` and ``select-layers`` measure on a loaded model: recall and reasoning.

Why one module: both commands evaluate many variants of one loaded model (see
:mod:`qkrestore.evaluate.candidates`), so everything that depends only on the model's inputs (NIAH prompts,
tokenised items) is built once here and reused for every variant.

* **NIAH recall** uses the built-in RULER-style probe of :mod:`qkrestore.evaluate.niah` (its
  prompts, depths and scorer): the prompts of a length are scored in batches, by one
  teacher-forced pass (default) or by batched greedy generation (:mod:`qkrestore.evaluate.scoring`).
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
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import QKRestoreError
from ..io.runtime import forward_errors, load_causal_lm, load_tokenizer
from . import scoring as sc
from .niah import (
    SCORINGS,
    TASKS,
    build_samples,
    check_lengths,
    context_length,
    forced_verdict,
    sample_depths,
    score,
)

EXAMPLE_REASONING = "reasoning-example.jsonl"
NIAH_CHECK_TEXT = (
    "Some special magic numbers are hidden within the following text. One of the special magic "
    "uuids for quiet-harbor is: 3f2b8c1e-9a4d-4e7f-8b6a-1c2d3e4f5a6b. In practice, most founders"
    " keep returning to 1234567.\n Answer: The special magic number is 7654321."
)
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
    source: str | None = None  # "FILE:LINE", for errors about this item


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
                where,
            )
        )
    if not items:
        raise QKRestoreError(f"{option} {path}: no items")
    return items


def needs_tokenizer(items: Sequence[Item]) -> bool:
    return any(isinstance(x.prompt, str) or isinstance(x.answer, str) for x in items)


# -- the loaded model -----------------------------------------------------------------------------


def load_model(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> Any:
    """One causal LM from a local folder, on ``device`` (or spread by ``device_map``) in
    ``dtype``, in eval mode."""
    return load_causal_lm(
        path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, device_map=device_map
    )


@dataclass(frozen=True)
class NiahSettings:
    """The built-in probe's options (those of ``qkrestore niah``), checked when made: lengths are
    bounded here (:func:`qkrestore.evaluate.niah.check_lengths`), before any work, and against
    the model's context once it is loaded."""

    lengths: tuple[int, ...]
    task: str = "single-2"
    samples: int = 10
    depth: float | None = None
    seed: int = 0
    max_new_tokens: int | None = None
    chat_template: bool = False
    scoring: str = "forced"
    beyond_context: bool = False

    def __post_init__(self) -> None:
        check_lengths(self.lengths)
        if self.task not in TASKS:
            raise QKRestoreError(f"--task {self.task}: use one of {', '.join(TASKS)}")
        if self.scoring not in SCORINGS:
            raise QKRestoreError(f"--scoring {self.scoring}: use one of {', '.join(SCORINGS)}")
        if self.samples < 1:
            raise QKRestoreError(f"--samples {self.samples}: give at least 1")

    def new_tokens(self) -> int:
        """Tokens generated (``generate``) or the answer's cut (``forced``): 24, 48 for UUIDs."""
        return self.max_new_tokens or (48 if self.task == "single-3" else 24)

    def prompts_key(self) -> tuple[Any, ...]:
        """What the prompts depend on (not the scoring rule)."""
        return (self.lengths, self.task, self.samples, self.depth, self.seed, self.chat_template)


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
        self.device = sc.input_device(model, device)
        self.autocast = autocast and self.device.type == "cuda"
        self.label = label
        # id(items) → (items, encoded): the items are kept so that their id stays theirs
        self._encoded: dict[int, tuple[Sequence[Item], list[tuple[list[int], list[int]]]]] = {}
        # the probe's prompts per NiahSettings.prompts_key() of one length: (sample, length,
        # depth, ids, gold)
        self._niah: dict[tuple[Any, ...], list[tuple[Any, int, float, list[int], list[int]]]] = {}

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

    def _check_ids(self, ids: Sequence[int], where: str) -> None:
        vocab = sc.input_vocabulary(self.model)
        if vocab is not None and ids and max(ids) >= vocab:
            raise QKRestoreError(
                f"{where}: token id {max(ids)} is beyond the model's vocabulary "
                f"({vocab} ids, 0..{vocab - 1})",
                hint="token ids must come from this model's tokenizer",
            )

    def _encode(self, items: Sequence[Item]) -> list[tuple[list[int], list[int]]]:
        key = id(items)
        if key not in self._encoded:
            tok: Any = self.tok
            if needs_tokenizer(items) and tok is None:
                raise QKRestoreError(
                    f"{self.label}: text items need the model's tokenizer files",
                    hint="copy the tokenizer into the model folder, or give token ids",
                )
            out: list[tuple[list[int], list[int]]] = []
            for x in items:
                where = x.source or f"item {len(out) + 1}"
                p = list(x.prompt) if isinstance(x.prompt, tuple) else tok(x.prompt)["input_ids"]
                a = (
                    list(x.answer)
                    if isinstance(x.answer, tuple)
                    else tok(x.answer, add_special_tokens=False)["input_ids"]
                )
                if not p or not a:
                    raise QKRestoreError(f"{where}: the prompt or answer tokenises to nothing")
                self._check_ids(p + a, where)
                out.append((p, a))
            self._encoded[key] = (items, out)
        return self._encoded[key][1]

    def _forced(
        self,
        pairs: Sequence[sc.Pair],
        extra: int,
        max_rows: int,
        progress: Progress | None,
        *,
        kept_only: bool,
        logprobs: bool,
    ) -> list[tuple[list[int], list[float]]]:
        """:func:`qkrestore.evaluate.scoring.forced_pass` over ``pairs`` in batches sized to memory:
        longest first, at most ``max_rows`` items, :func:`qkrestore.evaluate.scoring.token_budget` padded
        tokens and :data:`BATCH_LOGITS` logits. The logits are counted at every padded position
        (the bound ``--batch-size`` documents for items, which keeps short items' batches small
        too), or, with ``kept_only`` and a model that computes logits only where they are read,
        at those positions (the NIAH probe: a few positions of long prompts)."""
        results: list[tuple[list[int], list[float]]] = [([], []) for _ in pairs]
        widths = [len(p) + len(a) for p, a in pairs]
        spans = [(len(p) - 1, len(p) + len(a) - 1 + extra) for p, a in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -widths[i])
        keeps = kept_only and sc.keeps_logits(self.model)
        max_tokens = sc.token_budget(self.model, self.device, width=max(widths, default=0))
        max_logits = max(1, BATCH_LOGITS // _vocabulary(self.model))

        def run(batch: list[int]) -> None:
            got = sc.forced_pass(
                self.model, [pairs[i] for i in batch], extra, self.device, logprobs
            )
            for i, r in zip(batch, got):
                results[i] = r

        for batch in sc.plan_batches(
            order, widths, spans if keeps else None, max_rows, max_tokens, max_logits
        ):
            with self.context(widths[batch[0]]):
                sc.run_split(batch, run, self.device)
            if progress:
                progress(len(batch))
        return results

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
        got = self._forced(encoded, 0, self.batch_size, progress, kept_only=False, logprobs=True)
        return [
            {
                "exact": arg == a,
                "loglik": sum(logp) / len(logp),
                "tokens": len(a),
            }
            for (_, a), (arg, logp) in zip(encoded, got)
        ]

    def niah_prompts(self, s: NiahSettings) -> list[tuple[Any, int, float, list[int], list[int]]]:
        """The probe's prompts of ``s``, built and tokenised once per length (the lengths not
        built yet in one go, so that ``niah`` builds them all before scoring any): per sample, the sample, its
        length and depth, the prompt's ids (as the model reads them) and the value's ids after
        it (the gold answer of the teacher-forced pass)."""
        tok = self.tok
        if tok is None:
            raise QKRestoreError(
                f"{self.label}: the NIAH probe needs the model's tokenizer files",
                hint="copy the tokenizer next to the model, or pass --recall FILE.jsonl "
                "with token-id prompts",
            )
        keys = {n: replace(s, lengths=(n,)).prompts_key() for n in s.lengths}
        todo = [n for n in dict.fromkeys(s.lengths) if keys[n] not in self._niah]
        if todo:  # every missing length in one lock-step build: the most prompts per round
            encode, count = _encoder(tok)
            chat = None
            if s.chat_template:

                def chat(body: str) -> str:
                    return tok.apply_chat_template(
                        [{"role": "user", "content": body}],
                        tokenize=False,
                        add_generation_prompt=True,
                    )

            name = str(getattr(tok, "name_or_path", "") or self.label)
            jobs = [
                (length, i, d)
                for length in todo
                for i, d in enumerate(sample_depths(s.samples, s.depth))
            ]
            samples = build_samples(
                [(s.task, length, d, s.seed * 100_003 + i) for length, i, d in jobs],
                encode,
                count,
                chat=chat,
                tokenizer=name,
            )
            # one batched call: a fast tokenizer encodes the prompts on every core
            ids_all = tok([x.prompt for x in samples], add_special_tokens=not s.chat_template)[
                "input_ids"
            ]
            for n in todo:
                self._niah[keys[n]] = []
            for x, (length, _, d), ids in zip(samples, jobs, ids_all):
                gold = _gold(encode, x.prompt, x.needle.value)
                self._niah[keys[length]].append((x, length, d, list(ids), gold))
        return [b for n in s.lengths for b in self._niah[keys[n]]]

    def niah_records(
        self, s: NiahSettings, progress: Progress | None = None
    ) -> list[dict[str, Any]]:
        """Per prompt of the built-in probe: length, depth, prompt tokens, the expected value, the
        model's answer and whether it is right (``s.scoring``: ``forced`` reads the answer's known
        prefix from one teacher-forced pass, :func:`~qkrestore.evaluate.niah.forced_verdict`;
        ``generate`` generates it whole, in left-padded batches)."""
        context = context_length(getattr(self.model, "config", None))
        check_lengths(s.lengths, context, beyond_context=s.beyond_context, where=self.label)
        built = self.niah_prompts(s)
        tok: Any = self.tok
        new_tokens = s.new_tokens()
        eos = sc.eos_ids(self.model, tok)
        answers: list[tuple[bool, str]]
        if s.scoring == "forced":
            for _, _, _, ids, gold in built:
                self._check_ids(ids + gold, self.label)
            pairs = [(b[3], b[4]) for b in built]
            got = self._forced(pairs, 1, len(built), progress, kept_only=True, logprobs=False)
            answers = []
            for (sample, _, _, _, gold), (arg, _) in zip(built, got):
                ok, known = forced_verdict(
                    lambda t: tok.decode(t, skip_special_tokens=True),
                    arg,
                    gold,
                    sample.needle.value,
                    new_tokens,
                    eos,
                )
                answers.append((ok, tok.decode(known, skip_special_tokens=True)))
        else:
            outs = self._generate([b[3] for b in built], new_tokens, progress)
            answers = []
            for (sample, *_), out in zip(built, outs):
                text = tok.decode(out, skip_special_tokens=True)
                answers.append((score(text, sample.needle.value), text))
        return [
            {
                "length": length,
                "depth": round(d, 4),
                "prompt_tokens": len(ids),
                "expected": sample.needle.value,
                "answer": text.strip()[:200],
                "correct": ok,
            }
            for (sample, length, d, ids, _), (ok, text) in zip(built, answers)
        ]

    def _generate(
        self, prompts: Sequence[list[int]], new_tokens: int, progress: Progress | None
    ) -> list[list[int]]:
        """Greedy answers of ``prompts`` in left-padded batches sized to memory (the key/value
        cache and the padding mask counted)."""
        tok: Any = self.tok
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        pad = 0 if pad is None else int(pad)
        eos = sc.eos_ids(self.model, tok)
        results: list[list[int]] = [[] for _ in prompts]
        widths = [len(p) + new_tokens for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -widths[i])
        max_tokens = sc.token_budget(self.model, self.device, cache=True, width=max(widths))

        def run(batch: list[int]) -> None:
            got = sc.generate_batch(
                self.model, [prompts[i] for i in batch], new_tokens, pad, eos, self.device
            )
            for i, r in zip(batch, got):
                results[i] = r

        for batch in sc.plan_batches(order, widths, None, len(prompts), max_tokens, 1 << 62):
            with self.context(widths[batch[0]]):
                sc.run_split(batch, run, self.device)
            if progress:
                progress(len(batch))
        return results

    def niah(self, s: NiahSettings, progress: Progress | None = None) -> dict[str, float]:
        """Accuracy per length of the built-in probe (prompts built once, reused)."""
        hits = dict.fromkeys(s.lengths, 0)
        for r in self.niah_records(s, progress):
            hits[r["length"]] += r["correct"]
        return {str(n): hits[n] / s.samples for n in s.lengths}


def _encoder(tok: Any) -> tuple[Callable[[str], list[int]], Callable[[list[str]], list[int]]]:
    """``text → ids`` without special tokens, and ``texts → token counts`` for the prompt builder.

    Where the fast tokenizer's Rust encoder gives the ids the tokenizer gives (checked on the
    probe's own text) both use it directly: one encoding is a quarter faster than through
    transformers' call, and counting goes through one ``encode_batch`` per round, which runs on
    every core (a single ``encode`` holds the GIL, so threads cannot share the work). Otherwise
    both use the tokenizer's own call, text by text."""

    def slow(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    def count_slow(texts: list[str]) -> list[int]:
        return [len(slow(t)) for t in texts]

    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is None:
        return slow, count_slow

    def fast(text: str) -> list[int]:
        return backend.encode(text, add_special_tokens=False).ids

    def count_fast(texts: list[str]) -> list[int]:
        return [len(e.ids) for e in backend.encode_batch(texts, add_special_tokens=False)]

    probe = NIAH_CHECK_TEXT
    try:
        same = fast(probe) == slow(probe)
    except Exception:  # any failure means: use the tokenizer's own call
        same = False
    return (fast, count_fast) if same else (slow, count_slow)


def _gold(encode: Callable[[str], list[int]], prompt: str, value: str) -> list[int]:
    """The tokens of `` value`` as they follow ``prompt``: those that encoding the prompt's last
    words with the value adds (tokenizers split at spaces, so the last words decide), or, where
    that is not a clean extension, the value's own tokens. Only what is teacher-forced depends on
    it: the verdict reads the model's own arg-max tokens."""
    tail = prompt[-64:]
    tail = tail[tail.find(" ") + 1 :] if " " in tail else tail
    bare, full = encode(tail), encode(tail + " " + value)
    if full[: len(bare)] == bare and len(full) > len(bare):
        return full[len(bare) :]
    return encode(" " + value)


def _vocabulary(model: Any) -> int:
    """Rows of the model's output layer (the logits' last dimension); 1 if it cannot be told."""
    return sc.vocabulary(model)


def _batches(
    order: Sequence[int], lengths: Sequence[int], size: int, max_tokens: int
) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (longest first) of at most ``size`` items and at most
    ``max_tokens`` padded tokens; an item longer than that forms a batch of its own."""
    return sc.plan_batches(order, lengths, None, size, max_tokens, 1 << 62)


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
        import lm_eval  # type: ignore[import-untyped]  # noqa: F401
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
    import lm_eval  # type: ignore[import-untyped]
    from lm_eval.models.huggingface import HFLM  # type: ignore[import-untyped]
    from lm_eval.tasks import TaskManager  # type: ignore[import-untyped]

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
