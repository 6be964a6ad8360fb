"""Scoring on a loaded causal LM at hardware speed: teacher-forced passes and batched generation.

Why a module of its own: ``niah``, ``sweep`` and ``select-layers`` all ask one question of a loaded
model many times — what does greedy decoding produce after this prompt? — and the answer is cheap
only when many prompts share one forward pass and the model computes no more than is read:

* **Teacher-forced passes** (:func:`forced_pass`): prompt + gold answer, right-padded into one
  batch, no attention mask (in a causal LM the padding after an item cannot reach its positions, so
  attention keeps its causal fast path: SDPA/flash, no N×N mask), and logits only at the answer
  positions (transformers' ``logits_to_keep``), so an 8K-token prompt costs no 8K × vocabulary
  logits. The arg-max at answer position ``j`` is what greedy decoding would emit there *if* it had
  emitted the gold tokens before ``j``; up to the first disagreement it is greedy decoding itself.
* **Batched greedy generation** (:func:`generate_batch`), left-padded with an attention mask, for
  where the whole greedy answer is needed (today's NIAH rule reads all of it).

Batches are sized to memory (:func:`token_budget`, :func:`plan_batches`) and halved when a CUDA
batch still runs out of memory (:func:`run_split`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")
Pair = tuple[list[int], list[int]]  # prompt ids, answer ids

# Memory a batch may take beyond the model: on CUDA this share of the free memory at the time of
# the call, on the CPU a fixed amount (a CPU has no allocator to ask, and swaps instead of failing).
CUDA_SHARE = 0.5
CPU_BYTES = 4 * 2**30
# padded tokens a batch may add, as a share of its real ones (see plan_batches)
MAX_PADDING = 0.125
PADDING_FREE = 2048


# -- sizing (pure, given the model's config) -------------------------------------------------------


def _cfg(model: Any) -> Any:
    cfg = getattr(model, "config", None)
    text = getattr(cfg, "text_config", None) if cfg is not None else None
    return text if text is not None and getattr(text, "hidden_size", None) else cfg


def bytes_per_token(model: Any, cache: bool = False) -> int:
    """A generous estimate of the activation memory one token takes in a forward pass (float32
    everywhere: norms and autocast upcast), plus its key/value cache when ``cache``."""
    cfg = _cfg(model)
    hidden = int(getattr(cfg, "hidden_size", 0) or 1024)
    inter = max(
        int(getattr(cfg, "intermediate_size", 0) or 0),
        int(getattr(cfg, "moe_intermediate_size", 0) or 0)
        * int(getattr(cfg, "num_experts_per_tok", 1) or 1),
        4 * hidden,
    )
    total = 4 * (8 * hidden + 4 * inter)
    if cache:
        layers = int(getattr(cfg, "num_hidden_layers", 0) or 32)
        heads = int(
            getattr(cfg, "num_key_value_heads", 0) or getattr(cfg, "num_attention_heads", 1)
        )
        head_dim = int(getattr(cfg, "head_dim", 0) or hidden // max(1, heads))
        total += 4 * 2 * layers * heads * head_dim
    return total


def token_budget(model: Any, device: torch.device, cache: bool = False, width: int = 0) -> int:
    """Padded tokens one batch may hold on ``device`` (at least one item always runs); ``width``
    adds a boolean attention-mask row per token (a padded or sliding-window batch of ``width``
    columns materialises one)."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        room = int(free * CUDA_SHARE)
    else:
        room = CPU_BYTES
    return max(1, room // (bytes_per_token(model, cache) + width))


def vocabulary(model: Any) -> int:
    """Rows of the model's output layer (the logits' last dimension); 1 if it cannot be told."""
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, TypeError, IndexError):
        return int(getattr(getattr(model, "config", None), "vocab_size", None) or 1)


def input_vocabulary(model: Any) -> int | None:
    """Rows of the input embedding: the token ids the model accepts are ``0 .. rows - 1``."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, TypeError, IndexError):
        v = getattr(_cfg(model), "vocab_size", None)
        return int(v) if v else None


def keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (logits only where they are read)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _range(spans: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The one run of positions that covers the half-open ``spans``."""
    return min(a for a, _ in spans), max(b for _, b in spans)


def plan_batches(
    order: Sequence[int],
    widths: Sequence[int],
    spans: Sequence[tuple[int, int]] | None,
    max_rows: int,
    max_tokens: int,
    max_logits: int,
    max_padding: float = MAX_PADDING,
) -> Iterator[list[int]]:
    """Consecutive runs of ``order`` (longest first) of at most ``max_rows`` items, at most
    ``max_tokens`` padded tokens, at most ``max_logits`` rows of logits, and padding of at most
    ``max_padding`` of the batch's real tokens (or :data:`PADDING_FREE` tokens, which cost less
    than another batch): a batch's logits are kept at the one run of
    positions covering its items' ``spans`` (what :func:`forced_pass` asks ``logits_to_keep``
    for), or, with ``spans=None``, at every padded position. An item too big for any batch forms
    a batch of its own.

    The padding bound keeps prompts of different lengths apart: 8K and 4K prompts in one batch
    spend a third of it on padding (and more of the attention, which grows with the square)."""
    batch: list[int] = []
    real = 0
    for i in order:
        if batch:
            rows = len(batch) + 1
            width = max(widths[batch[0]], widths[i])
            if spans is None:
                kept = width
            else:
                a, b = _range([spans[j] for j in [*batch, i]])
                kept = b - a
            if (
                rows > max_rows
                or rows * width > max_tokens
                or rows * kept > max_logits
                or rows * width - real - widths[i]
                > max(max_padding * (real + widths[i]), PADDING_FREE)
            ):
                yield batch
                batch, real = [], 0
        batch.append(i)
        real += widths[i]
    if batch:
        yield batch


def run_split(batch: list[T], run: Callable[[list[T]], None], device: torch.device) -> None:
    """``run(batch)``; on CUDA out-of-memory, the two halves one after the other (down to one item,
    whose failure is the caller's to report)."""
    import torch

    try:
        run(batch)
    except torch.cuda.OutOfMemoryError:
        if len(batch) == 1 or device.type != "cuda":
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        run_split(batch[:half], run, device)
        run_split(batch[half:], run, device)


# -- passes ----------------------------------------------------------------------------------------


def input_device(model: Any, device: torch.device) -> torch.device:
    """Where a model's inputs go: ``device``, or the input embedding's device when the model is
    spread over several devices (``device_map``)."""
    import torch

    if getattr(model, "hf_device_map", None):
        w = model.get_input_embeddings().weight
        if w.device.type != "meta":
            return w.device
        return torch.device("cpu")
    return device


def forced_pass(
    model: Any,
    pairs: Sequence[Pair],
    extra: int,
    device: torch.device,
    logprobs: bool = True,
) -> list[tuple[list[int], list[float]]]:
    """One teacher-forced pass over ``pairs`` (right-padded, no mask).

    Per pair: the arg-max token at each answer position and, with ``extra=1``, at the answer's
    last token (``len(answer) + extra`` ids: index ``j`` is the model's choice for answer token
    ``j`` given the prompt and the gold tokens before it; the last, the choice after the whole
    gold answer), and (``logprobs``) the natural-log probability of each gold answer token.
    """
    import torch

    if extra not in (0, 1):
        raise ValueError(f"extra={extra}: 0 or 1 positions past the answer")
    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.zeros((len(pairs), width), dtype=torch.long)
    spans = []
    for row, (p, a) in enumerate(pairs):
        seq = p + a
        ids[row, : len(seq)] = torch.tensor(seq)
        spans.append((len(p) - 1, len(p) + len(a) - 1 + extra))
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "use_cache": False}
    first = 0
    if keeps_logits(model):
        first, last = _range(spans)
        kwargs["logits_to_keep"] = torch.arange(first, min(last, width), device=device)
    logits = model(**kwargs).logits
    argmax = logits.argmax(-1).tolist()  # one transfer for the whole batch
    out = []
    for row, ((_, a), (s, e)) in enumerate(zip(pairs, spans)):
        arg = argmax[row][s - first : e - first]
        logp: list[float] = []
        if logprobs:
            lg = logits[row, s - first : s - first + len(a)].float()
            target = torch.tensor(a, device=lg.device)
            logp = torch.log_softmax(lg, -1).gather(1, target[:, None])[:, 0].double().tolist()
        out.append((arg, logp))
    return out


def generate_batch(
    model: Any,
    prompts: Sequence[list[int]],
    new_tokens: int,
    pad_id: int,
    eos: set[int],
    device: torch.device,
) -> list[list[int]]:
    """Greedy generation for several prompts at once (left-padded, with an attention mask): per
    prompt, the new tokens up to and including the first end-of-sequence token, as ``generate``
    returns them for that prompt alone."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    rows = []
    for row in out[:, width:].tolist():
        for j, t in enumerate(row):
            if t in eos:
                row = row[: j + 1]
                break
        rows.append(row)
    return rows


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids at which ``generate`` stops (the generation config's, else the tokenizer's)."""
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None)
    if e is None:
        e = getattr(tokenizer, "eos_token_id", None)
    if e is None:
        return set()
    return {int(x) for x in (e if isinstance(e, (list, tuple)) else [e])}
