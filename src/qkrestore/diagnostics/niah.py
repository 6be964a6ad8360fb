"""A small RULER-style needle-in-a-haystack probe, offline and deterministic.

Why it is here: QK-Restore is about long-range recall, and a quick before/after check on one's own
checkpoints should not need a benchmark harness or a download. The three tasks follow RULER's
``niah_single_{1,2,3}`` (Hsieh et al., 2024):

* ``single-1`` — a 7-digit number hidden in a repeated noise passage ("The grass is green. …");
* ``single-2`` — a 7-digit number hidden in essay-like prose (generated here from a fixed seed and
  word lists, where RULER uses Paul Graham's essays);
* ``single-3`` — a UUID hidden in the same prose.

The prompt asks for "the special magic number/uuid for <key>" and ends with an answer prefix; the
model generates greedily and a sample scores 1 when the needle value appears in the answer as a whole
token (not as part of a longer number or id) — RULER's ``string_match_all`` for one needle, made
strict about boundaries. Numbers are for comparing checkpoints with each other; for numbers that
compare with papers use lm-evaluation-harness's ``ruler`` tasks.
"""

from __future__ import annotations

import random
import re
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import QKRestoreError
from ..runtime import load_causal_lm, load_tokenizer
from .attention import forward_errors

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


@dataclass(frozen=True)
class Sample:
    """One prompt: its text, token count, where the needle sits, and the answer."""

    prompt: str
    tokens: int
    depth: float  # asked for
    needle_tokens: tuple[int, int]  # [start, end) of the needle sentence in the prompt's tokens
    context_tokens: tuple[int, int]  # [start, end) of the haystack (needle included)
    needle: Needle

    @property
    def actual_depth(self) -> float:
        """Where the needle starts within the haystack, as a fraction of the haystack around it."""
        (a, b), (s, e) = self.context_tokens, self.needle_tokens
        return (s - a) / max(1, (b - a) - (e - s))


Encode = Callable[[str], list[int]]


def build_sample(
    task: str,
    length: int,
    depth: float,
    encode: Encode,
    seed: int = 0,
    chat: Callable[[str], str] | None = None,
) -> Sample:
    """A prompt of at most ``length`` tokens (as ``encode`` counts them, usually a few short) with the
    needle at ``depth`` of the haystack.

    Filler sentences are costed once each to size the haystack; the needle goes to the sentence
    boundary nearest ``depth``; then the real count of the whole prompt decides: whole sentences
    are added or removed until the next one would not fit, and the gap is filled with the words of
    one more sentence (found by bisection), so the prompt lands within a few tokens of ``length``.
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

    def grow(upto: int) -> None:
        while len(pool) < upto:
            if task == "single-1":
                more = noise_sentences(len(pool) + 256)[len(pool) :]
            else:
                more = essay_sentences(rng, 256)
            pool.extend(more)
            costs.extend(len(encode(" " + x)) for x in more)

    def render(count: int, words: int) -> tuple[str, int, int, int, int]:
        """The prompt of ``count`` sentences (+ ``words`` words of the next) and char offsets."""
        grow(count + 1)
        hay = pool[:count]
        hay_costs = costs[:count]
        if words:
            hay = [*hay, " ".join(pool[count].split()[:words])]
            hay_costs = [*hay_costs, len(encode(" " + hay[-1]))]
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

    def tokens(count: int, words: int = 0) -> int:
        return len(encode(render(count, words)[0]))

    overhead = tokens(0)
    if overhead > length:
        raise QKRestoreError(
            f"length {length}: the template and needle alone take {overhead} tokens"
        )
    count, total = 0, overhead
    while True:  # estimate from per-sentence costs
        grow(count + 1)
        if total + costs[count] > length:
            break
        total += costs[count]
        count += 1
    n = tokens(count)
    widest = max(costs[: count + 1])
    while n > length and count > 0:  # then correct with true counts, in safe jumps
        count = max(0, count - max(1, (n - length) // widest))
        n = tokens(count)
    while True:
        step = max(1, (length - n) // widest)
        if (m := tokens(count + step)) > length:
            if step == 1:
                break
            step = 1
            if (m := tokens(count + 1)) > length:
                break
        count, n = count + step, m
    lo, hi = 0, len(pool[count].split())  # words of the next sentence: most that still fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tokens(count, mid) <= length:
            lo = mid
        else:
            hi = mid - 1
    text, c0, c_s, c_e, c1 = render(count, lo)
    return Sample(
        prompt=text,
        tokens=len(encode(text)),
        depth=depth,
        needle_tokens=(len(encode(text[:c_s])), len(encode(text[:c_e]))),
        context_tokens=(len(encode(text[:c0])), len(encode(text[:c1]))),
        needle=needle,
    )


# -- scoring --------------------------------------------------------------------------------------


def score(answer: str, value: str) -> bool:
    """True when ``value`` appears in ``answer`` as a whole token (case-insensitive).

    "1234567" counts in "is 1234567." but not in "12345678"; a UUID must appear whole.
    """
    pattern = r"(?<![0-9A-Za-z-])" + re.escape(value) + r"(?![0-9A-Za-z-])"
    return re.search(pattern, answer, flags=re.IGNORECASE) is not None


def sample_depths(samples: int, depth: float | None) -> list[float]:
    """Depths for ``samples`` prompts: all ``depth`` if given, else evenly spread over [0, 1]."""
    if depth is not None:
        return [depth] * samples
    if samples == 1:
        return [0.5]
    return [i / (samples - 1) for i in range(samples)]


# -- running a model ------------------------------------------------------------------------------


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
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Generate an answer for every (length, sample) and score it; the ``niah`` JSON document."""
    tok = load_tokenizer(model_dir, what="niah")
    chat = None
    if use_chat_template:
        if not getattr(tok, "chat_template", None):
            raise QKRestoreError(f"{model_dir}: --chat-template, but the tokenizer has none")

        def chat(body: str) -> str:
            return tok.apply_chat_template(
                [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
            )

    model = load_causal_lm(
        model_dir, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )
    new_tokens = max_new_tokens or (48 if task == "single-3" else 24)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    notes = []
    limit = getattr(model.config, "max_position_embeddings", None)
    rows = []
    records = []
    for length in lengths:
        if isinstance(limit, int) and length + new_tokens > limit:
            notes.append(f"length {length} is beyond max_position_embeddings {limit}")
        hits = 0
        t0 = time.perf_counter()
        for i, d in enumerate(sample_depths(samples, depth)):
            s = build_sample(task, length, d, encode, seed=seed * 100_003 + i, chat=chat)
            ids = tok(s.prompt, add_special_tokens=not use_chat_template, return_tensors="pt")
            ids = {k: v.to(device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}
            with torch.inference_mode(), forward_errors(model_dir, device, s.tokens):
                out = model.generate(
                    **ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
                )
            answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            ok = score(answer, s.needle.value)
            hits += ok
            records.append(
                {
                    "length": length,
                    "depth": round(d, 4),
                    "prompt_tokens": int(ids["input_ids"].shape[1]),
                    "expected": s.needle.value,
                    "answer": answer.strip()[:200],
                    "correct": ok,
                }
            )
            if progress:
                progress(f"length {length} sample {i + 1}/{samples}: {'✓' if ok else '✗'}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
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
        "max_new_tokens": new_tokens,
        "results": rows,
        "samples": records,
        "notes": notes,
        "reference": "for official numbers use lm-evaluation-harness's RULER tasks (niah_single_1/2/3)",
    }
