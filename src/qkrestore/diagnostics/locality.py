"""Whether heads look near or far, on real prompts: the needle weight and the local mass per head.

Why not ``attn-distance``: on a prompt of random tokens a pretrained head has nothing to attend to, so
its mean distance sits at what uniform attention gives, (N−1)/4, and a head that became local after
fine-tuning looks the same as one that did not. Real text (the NIAH prompts of
:mod:`.niah`, or a user's file) gives heads their ordinary work, and two numbers per softmax layer and
head say where the weight goes:

* **local mass** ``L_h(k)``: for each query ``i ≥ k``, the attention weight on the last ``k`` tokens
  (keys ``i−k+1 … i``, itself included), averaged over those queries. 1.0 means the head sees only
  its last ``k`` tokens (a sliding window of width ≤ ``k`` reads exactly 1); uniform attention
  gives ``mean_i k/(i+1)``, reported as ``uniform.local``.
* **needle weight** ``R_h`` (NIAH prompts only): for each query of the question (everything after the
  haystack: question and answer prefix), the weight on the needle sentence's tokens, averaged over
  those queries. A retrieval head scores near 1; uniform attention gives ``mean_q |needle|/(q+1)``
  (``uniform.needle``).

Both are averaged over the prompts. Models run one prompt at a time with eager attention in float32;
each layer's ``[heads, N, N]`` weights are reduced inside a forward hook (as in :mod:`.attention`), so
only one layer's map is alive at a time. All models see the same token ids (tokenized once, with the
first model's tokenizer unless told otherwise).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import QKRestoreError
from ..evaluate import niah
from ..io.checkpoint import read_config
from ..io.runtime import forward_errors
from .attention import _attention_modules, layer_attentions, load_model, softmax_layers

DEFAULT_LAST_K = 64


# -- prompts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalityPrompt:
    """Token ids of one prompt, and (NIAH prompts) where its needle and question sit."""

    ids: torch.Tensor  # [N] int64
    label: str
    needle: tuple[int, int] | None = None  # [start, end) of the needle sentence
    question: tuple[int, int] | None = None  # [start, end) of the queries that ask for it

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "tokens": int(self.ids.numel()),
            "needle": list(self.needle) if self.needle else None,
            "question": list(self.question) if self.question else None,
        }


def _special_prefix(tok: Any, text: str, add_special: bool) -> tuple[list[int], int]:
    """The prompt's ids as the model sees them, and how many special tokens precede the text's own."""
    ids = list(tok(text, add_special_tokens=add_special)["input_ids"])
    plain = list(tok(text, add_special_tokens=False)["input_ids"])
    shift = len(ids) - len(plain)
    if shift < 0 or ids[shift : shift + len(plain)] != plain:
        shift = 0
    return ids, shift


def niah_prompts(
    tok: Any,
    length: int,
    samples: int,
    *,
    task: str = "single-2",
    seed: int = 0,
    use_chat_template: bool = False,
) -> list[LocalityPrompt]:
    """The ``niah`` command's prompts (same builder, depths spread over 0..1), as token ids."""
    chat: Callable[[str], str] | None = None
    if use_chat_template:
        if not getattr(tok, "chat_template", None):
            raise QKRestoreError("--chat-template, but the tokenizer has none")

        def chat(body: str) -> str:
            return str(
                tok.apply_chat_template(
                    [{"role": "user", "content": body}], tokenize=False, add_generation_prompt=True
                )
            )

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    out = []
    for i, depth in enumerate(niah.sample_depths(samples, None)):
        s = niah.build_sample(task, length, depth, encode, seed=seed * 100_003 + i, chat=chat)
        ids, shift = _special_prefix(tok, s.prompt, not use_chat_template)
        n0, n1 = (x + shift for x in s.needle_tokens)
        q0 = s.context_tokens[1] + shift
        if not (0 <= n0 < n1 <= q0 < len(ids)):
            raise QKRestoreError(
                f"NIAH prompt {i}: needle {n0}..{n1} and question from {q0} do not fit its "
                f"{len(ids)} tokens (tokenizer boundaries)"
            )
        out.append(
            LocalityPrompt(
                torch.tensor(ids, dtype=torch.long),
                f"niah {task} depth {depth:.2f}",
                needle=(n0, n1),
                question=(q0, len(ids)),
            )
        )
    return out


def text_prompts(tok: Any, path: Path, length: int, samples: int) -> list[LocalityPrompt]:
    """Consecutive windows of ``length`` tokens of a text file (a BOS first where the tokenizer has one)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QKRestoreError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tok, "bos_token_id", None)
    head = [int(bos)] if isinstance(bos, int) else []
    step = length - len(head)
    windows = [ids[a : a + step] for a in range(0, len(ids) - step + 1, step)][:samples]
    if not windows:
        raise QKRestoreError(
            f"{path}: {len(ids)} tokens, fewer than one window of --length {length}"
        )
    return [
        LocalityPrompt(torch.tensor(head + w, dtype=torch.long), f"{path.name} window {i}")
        for i, w in enumerate(windows)
    ]


# -- the measures ---------------------------------------------------------------------------------


def local_mass(attn: torch.Tensor, last_k: int) -> torch.Tensor:
    """Per head, the mean over queries ``i ≥ last_k`` of the weight on keys ``i−last_k+1 … i``.

    ``attn`` is ``[heads, N, N]`` (query × key, causal); returns ``[heads]`` float64. One head at a
    time, as a difference of row-wise cumulative sums in float64.
    """
    heads, n, _ = attn.shape
    if not 0 < last_k < n:
        raise QKRestoreError(f"--last-k {last_k}: must be at least 1 and below the {n} tokens")
    rows = torch.arange(last_k, n, device=attn.device)
    out = torch.empty(heads, dtype=torch.float64)
    for h in range(heads):
        cs = attn[h].double().cumsum(-1)
        out[h] = (cs[rows, rows] - cs[rows, rows - last_k]).mean().cpu()
    return out


def span_weight(
    attn: torch.Tensor, queries: tuple[int, int], keys: tuple[int, int]
) -> torch.Tensor:
    """Per head, the mean over ``queries`` of the weight on ``keys`` (``[start, end)`` each)."""
    (q0, q1), (k0, k1) = queries, keys
    return attn[:, q0:q1, k0:k1].double().sum(-1).mean(-1).cpu()


def uniform_local(n: int, last_k: int) -> float:
    """What uniform causal attention gives for :func:`local_mass`."""
    return sum(last_k / (i + 1) for i in range(last_k, n)) / (n - last_k)


def uniform_span(queries: tuple[int, int], keys: tuple[int, int]) -> float:
    """What uniform causal attention gives for :func:`span_weight`."""
    (q0, q1), (k0, k1) = queries, keys
    return sum((k1 - k0) / (q + 1) for q in range(q0, q1)) / (q1 - q0)


# -- running models -------------------------------------------------------------------------------


@dataclass
class ModelLocality:
    """One model's measures per softmax layer and head, averaged over the prompts."""

    path: str
    kinds: dict[int, str]
    local: dict[int, list[float]] = field(default_factory=dict)
    needle: dict[int, list[float]] = field(default_factory=dict)  # empty without a needle
    seconds: float = 0.0
    capture: str = "hooks"

    def to_json(self) -> dict[str, Any]:
        def mean(v: list[float] | None) -> float | None:
            return sum(v) / len(v) if v else None

        return {
            "path": self.path,
            "seconds": round(self.seconds, 3),
            "capture": self.capture,
            "layers": [
                {
                    "layer": i,
                    "kind": self.kinds.get(i, "global"),
                    "local_mass": {"mean": mean(v), "heads": v},
                    "needle_weight": (
                        {"mean": mean(self.needle[i]), "heads": self.needle[i]}
                        if i in self.needle
                        else None
                    ),
                }
                for i, v in sorted(self.local.items())
            ],
        }


@dataclass
class LocalityReport:
    """Every model's measures on the same prompts, with what uniform attention would give."""

    source: str
    last_k: int
    prompts: list[LocalityPrompt]
    models: list[ModelLocality]
    device: str = "cpu"
    notes: list[str] = field(default_factory=list)

    @property
    def uniform(self) -> dict[str, float | None]:
        loc = [uniform_local(p.ids.numel(), self.last_k) for p in self.prompts]
        ndl = [uniform_span(p.question, p.needle) for p in self.prompts if p.needle and p.question]
        return {
            "local_mass": sum(loc) / len(loc) if loc else None,
            "needle_weight": sum(ndl) / len(ndl) if ndl else None,
        }

    def comparisons(self) -> list[dict[str, Any]]:
        """Per consecutive pair of models and layer: mean change of each measure, heads that rose."""
        out = []
        for k in range(1, len(self.models)):
            a, b = self.models[k - 1], self.models[k]
            layers = []
            for i in sorted(set(a.local) & set(b.local)):
                row: dict[str, Any] = {"layer": i, "heads": len(a.local[i])}
                for name, x, y in (
                    ("local_mass", a.local.get(i), b.local.get(i)),
                    ("needle_weight", a.needle.get(i), b.needle.get(i)),
                ):
                    if x is None or y is None or len(x) != len(y):
                        continue
                    diffs = [q - p for p, q in zip(x, y)]
                    row[name] = {
                        "mean_change": sum(diffs) / len(diffs),
                        "rose": sum(d > 0 for d in diffs),
                        "fell": sum(d < 0 for d in diffs),
                    }
                layers.append(row)
            out.append({"from": k - 1, "to": k, "layers": layers})
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "last_k": self.last_k,
            "device": self.device,
            "dtype": "float32",
            "prompts": [p.to_json() for p in self.prompts],
            "uniform": self.uniform,
            "models": [m.to_json() for m in self.models],
            "comparisons": self.comparisons(),
            "notes": list(self.notes),
        }


def _capture(
    model: Any,
    config: dict[str, Any],
    layers: list[int],
    ids: torch.Tensor,
    reduce: Callable[[int, torch.Tensor | None], None],
) -> str:
    """One forward pass calling ``reduce(layer, weights)`` per softmax layer; how they were caught."""
    modules = _attention_modules(model, layers)
    if modules is not None:
        handles = []
        for layer, module, index in modules:

            def hook(
                mod: Any, args: Any, output: Any, layer: int = layer, index: int = index
            ) -> None:
                reduce(layer, output[index] if isinstance(output, tuple) else None)

            handles.append(module.register_forward_hook(hook))
        try:
            model(input_ids=ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return "hooks"
    out = model(input_ids=ids, use_cache=False, output_attentions=True)
    pairs = layer_attentions(out, config, layers, "attn-locality")
    for layer, w in pairs:
        reduce(layer, w)
    return "output_attentions"


def run_model(
    path: Path,
    prompts: Sequence[LocalityPrompt],
    last_k: int,
    device: torch.device,
    *,
    trust_remote_code: bool = False,
    loader: Callable[..., Any] = load_model,
) -> ModelLocality:
    """Both measures for every head of every softmax layer of one model, averaged over ``prompts``."""
    config = read_config(Path(path))
    layers, kinds, _ = softmax_layers(config)
    result = ModelLocality(str(path), kinds)
    model = loader(Path(path), device, torch.float32, trust_remote_code)
    sums_local: dict[int, torch.Tensor] = {}
    sums_needle: dict[int, torch.Tensor] = {}
    t0 = time.perf_counter()
    for prompt in prompts:

        def reduce(
            layer: int, weights: torch.Tensor | None, prompt: LocalityPrompt = prompt
        ) -> None:
            if weights is None:
                raise QKRestoreError(
                    f"{path}: layer {layer} returned no attention weights (is eager attention used?)"
                )
            w = weights[0].float()
            loc = local_mass(w, last_k)
            sums_local[layer] = sums_local.get(layer, torch.zeros_like(loc)) + loc
            if prompt.needle and prompt.question:
                ndl = span_weight(w, prompt.question, prompt.needle)
                sums_needle[layer] = sums_needle.get(layer, torch.zeros_like(ndl)) + ndl

        ids = prompt.ids[None].to(device)
        with torch.inference_mode(), forward_errors(path, device, prompt.ids.numel()):
            result.capture = _capture(model, config, layers, ids, reduce)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - t0
    n = len(prompts)
    result.local = {i: (s / n).tolist() for i, s in sorted(sums_local.items())}
    with_needle = sum(1 for p in prompts if p.needle and p.question)
    if with_needle:
        result.needle = {i: (s / with_needle).tolist() for i, s in sorted(sums_needle.items())}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def locality_report(
    models: Sequence[Path],
    prompts: Sequence[LocalityPrompt],
    source: str,
    last_k: int,
    device: torch.device,
    *,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> LocalityReport:
    """Run every model on the same prompts (one model in memory at a time)."""
    if not prompts:
        raise QKRestoreError("no prompts to measure on")
    shortest = min(p.ids.numel() for p in prompts)
    if not 0 < last_k < shortest:
        raise QKRestoreError(
            f"--last-k {last_k}: must be at least 1 and below the shortest prompt ({shortest} tokens)"
        )
    runs = []
    for m in models:
        if progress:
            progress(f"running {m} on {device} ({len(prompts)} prompts) …")
        runs.append(
            run_model(Path(m), prompts, last_k, device, trust_remote_code=trust_remote_code)
        )
    return LocalityReport(source, last_k, list(prompts), runs, device=str(device))


# -- figure ---------------------------------------------------------------------------------------


def locality_figure(report: LocalityReport, path: Path, names: Sequence[str]) -> None:
    """Heat maps, layer × head: local mass (top row) and needle weight (bottom, NIAH prompts)."""
    import numpy as np

    from ..io.plots import require

    plt = require()
    measures = [("local_mass", f"local mass (last {report.last_k} tokens)")]
    if any(m.needle for m in report.models):
        measures.append(("needle_weight", "needle weight (question → needle)"))
    cols = len(report.models)
    fig, axes = plt.subplots(
        len(measures),
        cols,
        figsize=(3.2 * cols + 0.8, 3.6 * len(measures)),
        squeeze=False,
        layout="constrained",
    )
    for r, (key, title) in enumerate(measures):
        # One colour scale per row, shared by the models: 0..1 for the local mass, 0..the largest
        # head for the needle weight (its values are small unless a head retrieves).
        peak = max(
            (v for m in report.models for row in (m.needle.values()) for v in row), default=1.0
        )
        vmax = 1.0 if key == "local_mass" else max(peak, 1e-6)
        for c, (m, name) in enumerate(zip(report.models, names)):
            table = m.local if key == "local_mass" else m.needle
            layers = sorted(table)
            width = max((len(table[i]) for i in layers), default=1)
            grid = np.full((len(layers), width), np.nan)
            for row, i in enumerate(layers):
                grid[row, : len(table[i])] = table[i]
            ax = axes[r][c]
            im = ax.imshow(grid, aspect="auto", vmin=0.0, vmax=vmax, cmap="viridis")
            ax.set_title(f"{name}\n{title}", fontsize=8)
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            step = max(1, len(layers) // 8)
            ax.set_yticks(
                range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)]
            )
        fig.colorbar(im, ax=list(axes[r]), shrink=0.8)
    fig.savefig(path, dpi=120, facecolor="white")
    plt.close(fig)
