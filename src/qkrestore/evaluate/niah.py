"""A small RULER-style needle-in-a-haystack probe, offline and deterministic.

Why it is here: QK-Restore is about long-range recall, and a quick before/after check on one's own
checkpoints should not need a benchmark harness or a download. The three tasks follow RULER's
``niah_single_{1,2,3}`` (Hsieh et al., 2024):

* ``single-1`` — a 7-digit number hidden in a repeated noise passage ("The grass is green. …");
* ``single-2`` — a 7-digit number hidden in essay-like prose (generated here from a fixed seed and
  word lists, where RULER uses Paul Graham's essays);
* ``single-3`` — a UUID hidden in the same prose.

The prompt asks for "the special magic number/uuid for <key>" and ends with an answer prefix; a
sample scores 1 when the needle value appears in the model's greedy answer as a whole token (not as
part of a longer number or id) — RULER's ``string_match_all`` for one needle, made strict about
boundaries. By default the greedy answer is read from one teacher-forced pass over prompt + value
(``scoring="forced"``: right when greedy decoding starts its answer with the value; see
:func:`forced_verdict` for the exact relation); ``scoring="generate"`` generates ``max_new_tokens``
tokens and searches them all, as earlier versions did. Numbers are for comparing checkpoints with each other; for numbers that
compare with papers use lm-evaluation-harness's ``ruler`` tasks.
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QKRestoreError
from ..io.checkpoint import refuse_adapter

TASKS = ("single-1", "single-2", "single-3")
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
TEMPLATE = (
    "Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind}s afterwards.\n{context}\n"
    "What is the special magic {kind} for {key} mentioned in the provided text?"
)
ANSWER_PREFIX = " Answer: The special magic {kind} for {key} mentioned in the provided text is"
NEEDLE = "One of the special magic {kind}s for {key} is: {value}."

_ADJ = [
    "quiet",
    "bright",
    "ancient",
    "hollow",
    "restless",
    "careful",
    "gentle",
    "crooked",
    "silver",
    "distant",
    "humble",
    "eager",
    "frozen",
    "golden",
    "tangled",
    "patient",
    "curious",
    "stubborn",
    "narrow",
    "vivid",
]
_NOUN = [
    "harbor",
    "lantern",
    "meadow",
    "orchard",
    "violin",
    "compass",
    "glacier",
    "library",
    "canyon",
    "falcon",
    "quarry",
    "ribbon",
    "teapot",
    "sparrow",
    "tunnel",
    "voyage",
    "thimble",
    "beacon",
    "marble",
    "cottage",
]
_SUBJ = [
    "Most founders",
    "A good essay",
    "The best programmers",
    "Every startup",
    "An investor",
    "A careful reader",
    "The hardest problem",
    "Our first users",
    "A small team",
    "The market",
    "A new idea",
    "Good writing",
]
_VERB = [
    "tends to reward",
    "rarely notices",
    "quietly depends on",
    "often confuses",
    "slowly discovers",
    "learns to distrust",
    "keeps returning to",
    "underestimates",
    "is shaped by",
    "cannot ignore",
]
_OBJ = [
    "the details that seem boring at first",
    "what users actually do",
    "the cost of waiting",
    "problems that look like toys",
    "the habits of curious people",
    "a simple explanation",
    "the questions nobody asks",
    "the work that compounds",
    "ideas that sound wrong",
    "the difference between effort and progress",
    "a schedule that leaves room to think",
    "the advice of people who have built things",
]
_TAIL = [
    "and that is usually a good sign",
    "even when the evidence is thin",
    "in the early years",
    "more than anyone expects",
    "for reasons that become clear later",
    "without saying so",
    "which surprises most outsiders",
    "long before it shows up in numbers",
    "if you look closely enough",
    "and the effect grows over time",
]
_OPENERS = ("", "", "", "In practice, ", "Over time, ", "Oddly enough, ", "Looking back, ")


# -- haystacks and needles ------------------------------------------------------------------------


def essay_sentences(rng: random.Random, n: int) -> list[str]:
    """``n`` sentences of essay-like filler, from word lists and a seeded generator (no downloads)."""
    out = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)}, {rng.choice(_TAIL)}."
        opener = rng.choice(_OPENERS)
        out.append(opener + s[0].lower() + s[1:] if opener else s)
    return out


def noise_sentences(n: int) -> list[str]:
    """RULER's single-1 haystack: the noise passage repeated (cut to whole sentences)."""
    base = [s.strip() + "." for s in NOISE.split(".") if s.strip()]
    return [base[i % len(base)] for i in range(n)]


@dataclass(frozen=True)
class Needle:
    kind: str  # "number" or "uuid"
    key: str
    value: str


def make_needle(task: str, rng: random.Random) -> Needle:
    key = f"{rng.choice(_ADJ)}-{rng.choice(_NOUN)}"
    if task == "single-3":
        return Needle("uuid", key, str(uuid.UUID(int=rng.getrandbits(128), version=4)))
    return Needle("number", key, str(rng.randint(1_000_000, 9_999_999)))


# -- prompts --------------------------------------------------------------------------------------


Encode = Callable[[str], list[int]]


@dataclass(frozen=True)
class Sample:
    """One prompt: its text, token count, where the needle sits, and the answer.

    Where the needle and the haystack sit in tokens is counted on demand from character offsets
    (``needle_tokens``, ``context_tokens``): scoring never reads them, and counting them costs
    three encodings of the whole prompt.
    """

    prompt: str
    tokens: int
    depth: float  # asked for
    needle: Needle
    offsets: tuple[int, int, int, int]  # chars: haystack start, needle start, needle end, end
    encode: Encode = field(compare=False, repr=False)

    @property
    def needle_tokens(self) -> tuple[int, int]:
        """[start, end) of the needle sentence in the prompt's tokens."""
        _, s, e, _ = self.offsets
        return len(self.encode(self.prompt[:s])), len(self.encode(self.prompt[:e]))

    @property
    def context_tokens(self) -> tuple[int, int]:
        """[start, end) of the haystack (needle included) in the prompt's tokens."""
        c0, _, _, c1 = self.offsets
        return len(self.encode(self.prompt[:c0])), len(self.encode(self.prompt[:c1]))


Count = Callable[[list[str]], list[int]]
# one prompt's build: it yields texts whose token counts it needs, is sent those counts, and
# returns its Sample
Steps = Generator[list[str], list[int], Sample]


def build_sample(
    task: str,
    length: int,
    depth: float,
    encode: Encode,
    seed: int = 0,
    chat: Callable[[str], str] | None = None,
    tokenizer: str = "the tokenizer",
) -> Sample:
    """A prompt of at most ``length`` tokens (as ``encode`` counts them, usually a few short) with the
    needle at ``depth`` of the haystack (see :func:`sample_steps` for how it is sized)."""
    steps = sample_steps(task, length, depth, encode, seed=seed, chat=chat, tokenizer=tokenizer)
    return drive([steps], lambda texts: [len(encode(t)) for t in texts])[0]


def build_samples(
    jobs: Sequence[tuple[str, int, float, int]],
    encode: Encode,
    count: Count,
    chat: Callable[[str], str] | None = None,
    tokenizer: str = "the tokenizer",
) -> list[Sample]:
    """The samples of ``jobs`` (task, length, depth, seed), each the one :func:`build_sample` gives,
    built in lock step so that every round's token counts go to ``count`` in one call.

    Why: sizing a prompt counts its whole text about eight times, and a tokenizer's single
    ``encode`` holds Python's GIL, so threads cannot share the work; a fast tokenizer's
    ``encode_batch`` spreads one round of hundreds of prompts over every core. Repeated short texts
    (the haystack sentences, which recur across prompts) are counted once.
    """
    memo: dict[str, int] = {}

    def counted(texts: list[str]) -> list[int]:
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        for t, n in zip(todo, count(todo) if todo else []):
            if len(t) <= 512:
                memo[t] = n
            else:  # a whole prompt: asked for once, not worth keeping
                memo.setdefault(t, n)
        got = [memo[t] for t in texts]
        for t in todo:
            if len(t) > 512:
                del memo[t]
        return got

    return drive(
        [
            sample_steps(task, length, depth, encode, seed=seed, chat=chat, tokenizer=tokenizer)
            for task, length, depth, seed in jobs
        ],
        counted,
    )


def drive(builds: Sequence[Steps], count: Count) -> list[Sample]:
    """Run prompt builds to their ends, each round's texts counted together in one ``count``."""
    asked: dict[int, list[str]] = {}
    done: dict[int, Sample] = {}
    for i, b in enumerate(builds):
        try:
            asked[i] = next(b)
        except StopIteration as stop:
            done[i] = stop.value
    while asked:
        order = list(asked)
        flat = [t for i in order for t in asked[i]]
        counts = count(flat)
        at = 0
        for i in order:
            n = len(asked[i])
            mine, at = counts[at : at + n], at + n
            try:
                asked[i] = builds[i].send(mine)
            except StopIteration as stop:
                del asked[i]
                done[i] = stop.value
    return [done[i] for i in range(len(builds))]


def sample_steps(
    task: str,
    length: int,
    depth: float,
    encode: Encode,
    seed: int = 0,
    chat: Callable[[str], str] | None = None,
    tokenizer: str = "the tokenizer",
) -> Steps:
    """Build one prompt, yielding the texts whose token counts it needs (:func:`drive` answers).

    Filler sentences are costed once each to size the haystack; the needle goes to the sentence
    boundary nearest ``depth``; then the real count of the whole prompt decides: whole sentences
    are added or removed until the next one would not fit, and the gap is filled with the words of
    one more sentence (found by bisection), so the prompt lands within a few tokens of ``length``.

    Every loop is bounded: a haystack sentence costs at least one token in any real tokenizer, so
    more than ``length`` sentences means the tokenizer yields (next to) nothing, and the probe
    refuses, naming ``tokenizer``, instead of growing the haystack forever. ``encode`` is kept
    only for the sample's on-demand token positions.
    """
    if task not in TASKS:
        raise QKRestoreError(f"--task {task}: use one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise QKRestoreError(f"depth {depth}: must be between 0 and 1")
    rng = random.Random(f"{seed}/{task}/{length}/{depth}")
    needle = make_needle(task, rng)
    needle_text = NEEDLE.format(kind=needle.kind, key=needle.key, value=needle.value)
    answer = ANSWER_PREFIX.format(kind=needle.kind, key=needle.key)
    pool: list[str] = []
    costs: list[int] = []

    def grow(upto: int) -> Generator[list[str], list[int], None]:
        while len(pool) < upto:
            if task == "single-1":
                more = noise_sentences(len(pool) + 256)[len(pool) :]
            else:
                more = essay_sentences(rng, 256)
            pool.extend(more)
            costs.extend((yield [" " + x for x in more]))

    def render(
        count: int, words: int
    ) -> Generator[list[str], list[int], tuple[str, int, int, int, int]]:
        """The prompt of ``count`` sentences (+ ``words`` words of the next) and char offsets."""
        yield from grow(count + 1)
        hay = pool[:count]
        hay_costs = costs[:count]
        if words:
            hay = [*hay, " ".join(pool[count].split()[:words])]
            hay_costs = [*hay_costs, (yield [" " + hay[-1]])[0]]
        goal, acc, at = depth * sum(hay_costs), 0, 0
        while at < len(hay) and acc + hay_costs[at] / 2 <= goal:
            acc += hay_costs[at]
            at += 1
        context = " ".join([*hay[:at], needle_text, *hay[at:]])
        body = TEMPLATE.format(kind=needle.kind, key=needle.key, context=context)
        head = chat(body) if chat else body
        text = head + (answer.lstrip() if chat else answer)
        c0 = head.index(context)
        c_needle = c0 + (len(" ".join(hay[:at])) + 1 if at else 0)
        return text, c0, c_needle, c_needle + len(needle_text), c0 + len(context)

    counted: dict[tuple[int, int], int] = {}

    def tokens(count: int, words: int = 0) -> Generator[list[str], list[int], int]:
        if (count, words) in counted:
            return counted[count, words]
        if count > length:
            raise QKRestoreError(
                f"{tokenizer}: the tokenizer yields no tokens for the probe's text (more than "
                f"{length} haystack sentences fit in {length} tokens)",
                hint="the tokenizer files hold no usable vocabulary; copy the model's own "
                "tokenizer into the folder",
            )
        text = (yield from render(count, words))[0]
        counted[count, words] = (yield [text])[0]
        return counted[count, words]

    overhead = yield from tokens(0)
    if overhead > length:
        raise QKRestoreError(
            f"length {length}: the template and needle alone take {overhead} tokens"
        )
    count, total = 0, overhead
    while True:  # estimate from per-sentence costs
        yield from grow(count + 1)
        if total + costs[count] > length:
            break
        if count > length:
            yield from tokens(count)  # refuses: the sentences cost nothing
        total += costs[count]
        count += 1
    n = yield from tokens(count)
    widest = max(costs[: count + 1])
    while n > length and count > 0:  # then correct with true counts, in safe jumps
        count = max(0, count - max(1, (n - length) // widest))
        n = yield from tokens(count)
    while True:
        step = max(1, (length - n) // widest)
        if (m := (yield from tokens(count + step))) > length:
            if step == 1:
                break
            step = 1
            if (m := (yield from tokens(count + 1))) > length:
                break
        count, n = count + step, m
    lo, hi = 0, len(pool[count].split())  # words of the next sentence: most that still fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if (yield from tokens(count, mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    text, c0, c_s, c_e, c1 = yield from render(count, lo)
    return Sample(
        prompt=text,
        tokens=(yield from tokens(count, lo)),
        depth=depth,
        needle=needle,
        offsets=(c0, c_s, c_e, c1),
        encode=encode,
    )


# -- scoring --------------------------------------------------------------------------------------

SCORINGS = ("forced", "generate")
# No prompt length is worth building beyond this, whatever the model claims (a haystack of 2^22
# tokens is ~16 MB of text per prompt); lengths past the model's own context need an override.
MAX_LENGTH = 2**22
CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)


def _pattern(value: str) -> re.Pattern[str]:
    return re.compile(
        r"(?<![0-9A-Za-z-])" + re.escape(value) + r"(?![0-9A-Za-z-])", flags=re.IGNORECASE
    )


def score(answer: str, value: str) -> bool:
    """True when ``value`` appears in ``answer`` as a whole token (case-insensitive).

    "1234567" counts in "is 1234567." but not in "12345678"; a UUID must appear whole.
    """
    return _pattern(value).search(answer) is not None


def forced_verdict(
    decode: Callable[[list[int]], str],
    argmax: Sequence[int],
    gold: Sequence[int],
    value: str,
    new_tokens: int,
    eos: set[int],
) -> tuple[bool, list[int]]:
    """The ``generate`` rule's verdict, decided from one teacher-forced pass where it can be.

    ``argmax[j]`` is the model's choice after the prompt and ``gold[:j]`` (``len(gold) + 1``
    entries). Up to and including the first ``j`` where it differs from ``gold`` (or the entry
    past the gold answer), these are exactly the tokens greedy decoding emits: the *known* prefix
    of the greedy answer (cut at ``new_tokens`` and after an end-of-sequence token, as
    ``generate`` stops there). Returns (correct, known prefix).

    Correct means :func:`score` holds for any continuation of the known prefix: a match of
    ``value`` that some decoded character follows (the boundary can no longer change), or any
    match once the known prefix is the whole answer. So a forced "correct" is generation's
    "correct"; a forced "wrong" is generation's "wrong" unless greedy decoding writes the value
    later than the known prefix (after other words, or in other tokens than ``gold``). Ties of
    the top two logits aside, the forced score is thus a lower bound of the generated one, equal
    whenever the model answers with the value first (tested item by item against ``generate``).
    """
    k = 0
    while k < len(gold) and k < len(argmax) and argmax[k] == gold[k]:
        k += 1
    known = list(argmax[: k + 1])[:new_tokens]
    whole = len(known) == new_tokens
    for j, t in enumerate(known):
        if t in eos:
            known, whole = known[: j + 1], True
            break
    text = decode(known)
    if whole:
        return score(text, value), known
    return any(m.end() < len(text) for m in _pattern(value).finditer(text)), known


def sample_depths(samples: int, depth: float | None) -> list[float]:
    """Depths for ``samples`` prompts: all ``depth`` if given, else evenly spread over [0, 1]."""
    if depth is not None:
        return [depth] * samples
    if samples == 1:
        return [0.5]
    return [i / (samples - 1) for i in range(samples)]


def context_length(config: Any) -> int | None:
    """The longest sequence a model's config says it takes (``max_position_embeddings`` or the
    family's name for it; a VLM's text config), or None when the config does not say."""
    for cfg in (getattr(config, "text_config", None), config):
        if cfg is None:
            continue
        for key in CONTEXT_KEYS:
            v = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    if isinstance(config, dict) and isinstance(config.get("text_config"), dict):
        return context_length(config["text_config"])
    return None


def check_lengths(
    lengths: Sequence[int],
    context: int | None = None,
    *,
    beyond_context: bool = False,
    where: str = "the model",
    option: str = "--lengths",
) -> None:
    """Refuse prompt lengths no run should attempt, before any work: below 64 tokens, above
    :data:`MAX_LENGTH`, or (unless ``beyond_context``) above the model's ``context`` (a length
    equal to it is fine: the prompt fits; only the answer's tokens then run past it)."""
    shown = ",".join(map(str, lengths))
    if not lengths or any(n < 64 for n in lengths):
        raise QKRestoreError(f"{option} {shown}: give lengths of at least 64 tokens")
    if any(n > MAX_LENGTH for n in lengths):
        raise QKRestoreError(f"{option} {shown}: at most {MAX_LENGTH} tokens a prompt")
    if context is not None and not beyond_context:
        over = [n for n in lengths if n > context]
        if over:
            raise QKRestoreError(
                f"{option} {shown}: {','.join(map(str, over))} beyond {where}'s context "
                f"(max_position_embeddings {context})",
                hint="measure within the context, or pass --beyond-context to measure anyway",
            )


def context_notes(lengths: Sequence[int], context: int | None, answer_tokens: int) -> list[str]:
    """Notes for lengths whose prompt or answer runs past the model's context."""
    if context is None:
        return []
    out = []
    for n in lengths:
        if n > context:
            out.append(f"length {n} is beyond max_position_embeddings {context}")
        elif n + answer_tokens > context:
            out.append(
                f"length {n}: the prompt fits max_position_embeddings {context}, but up to "
                f"{n + answer_tokens - context} of the {answer_tokens} answer tokens run past it"
            )
    return out


# -- running a model ------------------------------------------------------------------------------


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model folder, for its context length; one line when it is unreadable."""
    refuse_adapter(Path(model_dir))  # a PEFT adapter folder is named as one, with what to do
    path = Path(model_dir) / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QKRestoreError(f"{model_dir}: no config.json (not a model folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QKRestoreError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise QKRestoreError(f"{path}: not a JSON object")
    return doc
