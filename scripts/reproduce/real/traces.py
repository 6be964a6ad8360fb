"""Synthetic reasoning traces and the evaluation items of the real-model experiment.

Why these traces: the paper's setting is CoT-SFT whose useful dependencies are *local* (each step
reads the line before it). Multi-step addition with a worked chain of thought is that, in plain
text a chat model already half-knows, and its final answer is checkable exactly. Each problem is
one chat turn in the model's own chat template:

    user:      Add 347 + 582 + 119. Work it out step by step, then give the final line as 'Answer: N'.
    assistant: 347 + 582 = 929
               929 + 119 = 1048
               Answer: 1048

Two arms see the *same* problems in the *same* order (the stream depends on the seed only):
``short`` puts each problem in its own sequence; ``packed`` concatenates the step's problems into
sequences of ``pack_len`` tokens (a problem may straddle two sequences; positions run on across
problems, nothing is masked between them): long contexts whose useful dependencies are local.
Loss is on the assistant's tokens only, in both arms.

Evaluation items (token ids, so that prompt and answer are exactly the tokens scored):

* NIAH: qkrestore's own RULER-style prompts (:func:`qkrestore.evaluate.niah.build_sample`, the
  prompt built with the model's chat template, ending with the probe's answer prefix), answer
  ``" " + needle``; scored teacher-forced (every needle token must be the arg-max).
* reasoning: held-out problems (a separate random stream, none of them in any training stream),
  answer = the worked trace and the ``Answer:`` line; scored teacher-forced, i.e. greedy decoding
  must reproduce the worked solution token for token (a lower bound of final-answer accuracy).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# tokens kept free between a NIAH prompt and the length it is reported at, for the needle itself
# (a UUID is ~25 tokens): the prompt plus its answer then stays within the nominal length.
ANSWER_RESERVE = 32
INSTRUCTION = "Work it out step by step, then give the final line as 'Answer: N'."


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return f"Add {' + '.join(map(str, self.terms))}. {INSTRUCTION}"

    @property
    def total(self) -> int:
        return sum(self.terms)

    @property
    def trace(self) -> str:
        lines, acc = [], self.terms[0]
        for t in self.terms[1:]:
            lines.append(f"{acc} + {t} = {acc + t}")
            acc += t
        return "\n".join([*lines, f"Answer: {acc}"])


def problem(
    rng: random.Random, terms: tuple[int, int] = (3, 5), digits: tuple[int, int] = (2, 3)
) -> Problem:
    out = []
    for _ in range(rng.randint(*terms)):
        d = rng.randint(*digits)
        out.append(rng.randint(10 ** (d - 1), 10**d - 1))
    return Problem(tuple(out))


def eval_problems(n: int) -> list[Problem]:
    """The held-out set: its own stream, the same for every run."""
    rng = random.Random("real/eval")
    out: list[Problem] = []
    seen: set[tuple[int, ...]] = set()
    while len(out) < n:
        p = problem(rng)
        if p.terms not in seen:
            seen.add(p.terms)
            out.append(p)
    return out


def train_stream(seed: int, held_out: set[tuple[int, ...]]) -> Iterator[Problem]:
    """Training problems for ``seed`` (identical for both arms and every learning rate)."""
    rng = random.Random(f"real/train/{seed}")
    while True:
        p = problem(rng)
        if p.terms not in held_out:
            yield p


# -- tokenising in the chat format ----------------------------------------------------------------


class ChatCodec:
    """Prompt and response token ids of a problem, in the tokenizer's chat template."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        if not getattr(tok, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")
        end = getattr(tok, "eos_token", None)
        self.end_ids: list[int] = self.encode(self._turn_end()) if end is not None else []
        # The template rendered once around a marker: a prompt is then prefix + body + suffix
        # (checked on a sample), which saves a template render per problem (~10^4 per run).
        mark = "\x00BODY\x00"
        full = self._render(mark)
        self._affix: tuple[str, str] | None = None
        if full.count(mark) == 1:
            pre, post = full.split(mark)
            if self._render(INSTRUCTION) == pre + INSTRUCTION + post:
                self._affix = (pre, post)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, body: str) -> str:
        if self._affix is not None:
            return self._affix[0] + body + self._affix[1]
        return self._render(body)

    def _render(self, body: str) -> str:
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
        )
        return str(text)

    def _turn_end(self) -> str:
        """What the template writes after an assistant message (e.g. ``<|im_end|>\\n``)."""
        msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "MARK"}]
        full = str(self.tok.apply_chat_template(msgs, tokenize=False))
        return full[full.rindex("MARK") + len("MARK") :]

    def example(self, p: Problem) -> tuple[list[int], list[int]]:
        """(prompt ids, response ids) for training: the response ends with the turn's end."""
        return self.encode(self.chat_prompt(p.question)), self.encode(p.trace) + self.end_ids

    def eval_item(self, p: Problem) -> tuple[list[int], list[int]]:
        """(prompt ids, answer ids) for scoring: the answer is the trace through 'Answer: N'."""
        return self.encode(self.chat_prompt(p.question)), self.encode(p.trace)


# -- the two arms' batches ------------------------------------------------------------------------


@dataclass
class Batch:
    """Sequences of one SFT step: ids, loss mask (1 on response tokens) and true lengths."""

    ids: list[list[int]]
    mask: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(map(len, self.ids))

    @property
    def targets(self) -> int:
        return sum(map(sum, self.mask))


def short_batch(examples: Sequence[tuple[list[int], list[int]]]) -> Batch:
    """One problem per sequence."""
    return Batch([p + r for p, r in examples], [[0] * len(p) + [1] * len(r) for p, r in examples])


def packed_batch(examples: Sequence[tuple[list[int], list[int]]], pack_len: int) -> Batch:
    """The same problems concatenated and cut into sequences of ``pack_len`` tokens (the last one
    shorter)."""
    ids: list[int] = []
    mask: list[int] = []
    for p, r in examples:
        ids += p + r
        mask += [0] * len(p) + [1] * len(r)
    cut = range(0, len(ids), pack_len)
    return Batch([ids[i : i + pack_len] for i in cut], [mask[i : i + pack_len] for i in cut])


def batches(
    codec: ChatCodec, arm: str, seed: int, steps: int, per_step: int, pack_len: int,
    held_out: set[tuple[int, ...]],
) -> Iterator[Batch]:  # fmt: skip
    stream = train_stream(seed, held_out)
    for _ in range(steps):
        ex = [codec.example(next(stream)) for _ in range(per_step)]
        yield short_batch(ex) if arm == "short" else packed_batch(ex, pack_len)


# -- evaluation items -----------------------------------------------------------------------------


def niah_items(
    codec: ChatCodec, tasks: Sequence[str], lengths: Sequence[int], samples: int,
    seed_offset: int = 0,
) -> list[dict[str, Any]]:  # fmt: skip
    """NIAH prompts from qkrestore's own builder, in the chat template; depths evenly spread."""
    from qkrestore.evaluate.niah import build_sample, sample_depths

    out = []
    for task in tasks:
        for length in lengths:
            for i, d in enumerate(sample_depths(samples, None)):
                s = build_sample(
                    task,
                    length - ANSWER_RESERVE,
                    d,
                    codec.encode,
                    seed=seed_offset + i,
                    chat=codec.chat_prompt,
                )
                out.append(
                    {
                        "kind": "niah",
                        "task": task,
                        "length": length,
                        "index": i,
                        "prompt": codec.encode(s.prompt),
                        "answer": codec.encode(" " + s.needle.value),
                    }
                )
    return out


def reasoning_items(codec: ChatCodec, n: int) -> list[dict[str, Any]]:
    out = []
    for i, p in enumerate(eval_problems(n)):
        prompt, answer = codec.eval_item(p)
        out.append({"kind": "reasoning", "index": i, "prompt": prompt, "answer": answer})
    return out


def group_of(item: dict[str, Any]) -> str:
    """The unique group name each item is scored under (so sweep's JSON keeps every item)."""
    if item["kind"] == "niah":
        return f"niah/{item['task']}/{item['length']}/{item['index']}"
    return f"reasoning/{item['index']}"


def mean_tokens(codec: ChatCodec, n: int = 200, seed: int = 0) -> tuple[float, float, float]:
    """Mean prompt and response tokens of training problems, and the mean padded width of a short
    arm's batch row (for ``--plan-only``)."""
    stream = train_stream(seed, set())
    ex = [codec.example(next(stream)) for _ in range(n)]
    p = sum(len(a) for a, _ in ex) / n
    r = sum(len(b) for _, b in ex) / n
    return p, r, max(len(a) + len(b) for a, b in ex)


Encode = Callable[[str], list[int]]
