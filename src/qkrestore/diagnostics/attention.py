"""Mean attention distance (the paper's Eq. 17) per head, from a real forward pass.

    D_h = (1/N) Σ_i Σ_j a_ij (i − j)

is how far back, on average, head h looks: a_ij is the post-softmax weight of query i on key j. The
paper ranks softmax layers by how many heads' D_h fell after CoT-SFT (Section 7.3) and draws, for one
head, PRE's, POST's and the restored model's attention maps beside the log-ratio restored/POST
(Figure 4). This module builds the synthetic needle prompt, runs each model with eager attention,
and reduces every head's N×N map to D_h *inside a forward hook*, so that only one layer's weights
are alive at a time (``output_attentions=True`` would keep all of them: 48 layers × 32 heads of
8192² floats is hundreds of GB). Models whose classes do not declare their attention modules fall
back to ``output_attentions=True``.

Because Σ_j a_ij (i − j) = i·Σ_j a_ij − Σ_j a_ij·j, each head costs one matrix–vector product; the
row sum is kept (not assumed 1) so that attention sinks, which take mass out of the softmax, count
right.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, QKRestoreError
from ..families import Kind, layer_map, text_config
from ..io.checkpoint import read_config
from ..io.runtime import forward_errors, load_causal_lm

NEEDLE_LEN = 16  # tokens in the needle span
CUE_LEN = 8  # the needle's first tokens, repeated at the end of the prompt as the "question"
POOL_EXPLICIT = 512  # attention-map resolution kept for an explicitly chosen --layer/--head
POOL_ALL = 128  # resolution kept for every head when the plotted head is picked afterwards


# -- prompt ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NeedlePrompt:
    """Token ids of a synthetic needle prompt, and where its needle and cue sit."""

    ids: torch.Tensor  # [N] int64
    needle: tuple[int, int]  # [start, end) of the needle span
    cue: tuple[int, int]  # [start, end) of the repeated needle prefix at the end

    def to_json(self) -> dict[str, Any]:
        return {"tokens": int(self.ids.numel()), "needle": list(self.needle), "cue": list(self.cue)}


def needle_prompt(
    vocab_size: int,
    length: int,
    depth: float,
    seed: int = 0,
    *,
    exclude: Sequence[int] = (),
    bos: int | None = None,
) -> NeedlePrompt:
    """Random haystack ids with a needle span at ``depth`` and its first tokens repeated at the end.

    The repeated cue gives retrieval (induction) heads a reason to look back ``≈ (1 − depth)·N``
    tokens, which is what routing decay removes. Ids are drawn uniformly from ``[0, vocab_size)``
    minus ``exclude`` (special tokens) with a fixed seed, so every model sees the same prompt.
    """
    if not 0.0 <= depth <= 1.0:
        raise QKRestoreError(f"--depth {depth}: must be between 0 and 1")
    start = 1 if bos is not None else 0
    room = length - start - NEEDLE_LEN - CUE_LEN
    if room < 1:
        raise QKRestoreError(
            f"--length {length}: too short for a needle of {NEEDLE_LEN} and a cue of {CUE_LEN}"
        )
    banned = {int(x) for x in exclude}
    pool = torch.tensor([i for i in range(vocab_size) if i not in banned], dtype=torch.long)
    if pool.numel() < 2:
        raise QKRestoreError(f"vocab_size {vocab_size}: too few ordinary tokens for a prompt")
    gen = torch.Generator().manual_seed(seed)
    body = pool[torch.randint(pool.numel(), (length - start,), generator=gen)]
    needle = pool[torch.randint(pool.numel(), (NEEDLE_LEN,), generator=gen)]
    at = start + round(depth * room)
    ids = body.clone() if bos is None else torch.cat([torch.tensor([bos]), body])
    ids[at : at + NEEDLE_LEN] = needle
    ids[length - CUE_LEN :] = needle[:CUE_LEN]
    return NeedlePrompt(ids, (at, at + NEEDLE_LEN), (length - CUE_LEN, length))


# -- the metric -----------------------------------------------------------------------------------


def mean_attention_distance(attn: torch.Tensor) -> torch.Tensor:
    """Eq. 17 per head: ``attn`` is ``[heads, Nq, Nk]``; returns ``[heads]`` float64.

    Queries are the last ``Nq`` of the ``Nk`` positions (``Nq == Nk`` for a plain forward pass).
    One head at a time in float32 (float64 for float64 input), so a bf16 ``[H, N, N]`` block needs
    no float copy of its own.
    """
    heads, nq, nk = attn.shape
    work = torch.float64 if attn.dtype == torch.float64 else torch.float32
    pos_k = torch.arange(nk, device=attn.device, dtype=work)
    pos_q = torch.arange(nk - nq, nk, device=attn.device, dtype=torch.float64)
    out = torch.empty(heads, dtype=torch.float64)
    for h in range(heads):
        a = attn[h].to(work)
        weighted = (a @ pos_k).double()  # Σ_j a_ij j
        mass = a.sum(-1).double()  # Σ_j a_ij (1 without sinks)
        out[h] = (pos_q * mass - weighted).mean().cpu()
    return out


def pool_map(attn: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool an ``[Nq, Nk]`` map to at most ``size × size`` (float32, CPU) for drawing."""
    nq, nk = attn.shape
    k = max(1, math.ceil(max(nq, nk) / size))
    a = attn.float()
    pq, pk = (-nq) % k, (-nk) % k
    if pq or pk:
        a = torch.nn.functional.pad(a, (0, pk, 0, pq))
    a = a.reshape(a.shape[0] // k, k, a.shape[1] // k, k).mean((1, 3))
    return a.cpu()


# -- running a model ------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """One model's distances per softmax layer (and the attention maps kept for a plot)."""

    path: str
    layers: dict[int, list[float]] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)
    maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    mode: str = "hooks"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "seconds": round(self.seconds, 3),
            "capture": self.mode,
            "layers": [
                {
                    "layer": i,
                    "kind": self.kinds.get(i, "global"),
                    "mean": sum(d) / len(d) if d else None,
                    "heads": d,
                }
                for i, d in sorted(self.layers.items())
            ],
        }


def softmax_layers(config: dict[str, Any]) -> tuple[list[int], dict[int, str], list[str]]:
    """Softmax-attention layers (global and local) from the config, as the adapters read it."""
    notes: list[str] = []
    try:
        kinds = list(layer_map(config).kinds)
    except ConfigError as exc:
        n = text_config(config).get("num_hidden_layers")
        if not isinstance(n, int) or n <= 0:
            raise
        notes.append(f"{exc.message}; treating all {n} layers as softmax attention")
        kinds = [Kind.GLOBAL] * n
    layers = [i for i, k in enumerate(kinds) if k is not Kind.OTHER]
    return layers, {i: kinds[i].value for i in layers}, notes


def _record_specs(model: torch.nn.Module) -> list[tuple[type | None, str | None, int]]:
    """The modules transformers records as ``attentions``: (class, class-name suffix, output index)."""
    specs: list[tuple[type | None, str | None, int]] = []
    for owner in (model, getattr(model, "model", None)):
        table = getattr(type(owner), "_can_record_outputs", None) if owner is not None else None
        entry = table.get("attentions") if isinstance(table, dict) else None
        if entry is None:
            continue
        for item in entry if isinstance(entry, list) else [entry]:
            if isinstance(item, type):
                specs.append((item, None, 1))
            elif isinstance(item, str):
                specs.append((None, item, 1))
            elif hasattr(item, "target_class"):
                specs.append((item.target_class, item.class_name, int(item.index or 0)))
        if specs:
            break
    return specs


def _attention_modules(
    model: torch.nn.Module, layers: list[int]
) -> list[tuple[int, torch.nn.Module, int]] | None:
    """(layer, module, output index) for each softmax layer, or None when they cannot be found."""
    specs = _record_specs(model)
    if not specs:
        return None
    found: list[tuple[torch.nn.Module, int]] = []
    for name, module in model.named_modules():
        for cls, suffix, index in specs:
            if (cls is not None and isinstance(module, cls)) or (suffix and name.endswith(suffix)):
                found.append((module, index))
                break
    if not found:
        return None
    idx = [getattr(m, "layer_idx", None) for m, _ in found]
    if all(isinstance(i, int) for i in idx) and len(set(idx)) == len(idx):
        mapped = [(int(i), m, x) for i, (m, x) in zip(idx, found) if i in set(layers)]
        if len(mapped) == len(layers):
            return mapped
    if len(found) == len(layers):
        return [(layer, m, x) for layer, (m, x) in zip(layers, found)]
    return None


def layer_attentions(
    out: Any, config: dict[str, Any], layers: Sequence[int], where: str
) -> list[tuple[int, torch.Tensor]]:
    """(layer, attention weights) for each softmax layer from an ``output_attentions=True`` pass:
    transformers returns one map per layer, or (in some hybrids) one per softmax layer only."""
    attns = list(out.attentions or [])
    n_all = int(text_config(config).get("num_hidden_layers") or 0)
    if len(attns) == n_all:
        return [(i, attns[i]) for i in layers]
    if len(attns) == len(layers):
        return list(zip(layers, attns))
    raise QKRestoreError(
        f"{where}: the model returned {len(attns)} attention maps for {len(layers)} softmax "
        "layers; cannot tell which is which"
    )


def load_model(
    path: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> torch.nn.Module:
    """A causal LM with eager attention (the only implementation that returns the weights)."""
    return load_causal_lm(
        path,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_implementation="eager",
    )


def run_model(
    path: Path,
    prompt: NeedlePrompt,
    device: torch.device,
    dtype: torch.dtype,
    keep: tuple[int, int] | str | None = None,
    trust_remote_code: bool = False,
    loader: Callable[..., torch.nn.Module] = load_model,
) -> ModelRun:
    """Distances of every head of every softmax layer of one model on ``prompt``.

    ``keep``: ``(layer, head)`` keeps that head's map at ``POOL_EXPLICIT`` resolution; ``"all"``
    keeps every head's at ``POOL_ALL`` (for picking the plotted head afterwards); ``None`` none.
    """
    config = read_config(Path(path))
    layers, kinds, _ = softmax_layers(config)
    run = ModelRun(str(path), kinds=kinds)
    model = loader(Path(path), device, dtype, trust_remote_code)
    ids = prompt.ids[None].to(device)

    def reduce(layer: int, weights: torch.Tensor | None) -> None:
        if weights is None:
            raise QKRestoreError(
                f"{path}: layer {layer} returned no attention weights (is eager attention used?)"
            )
        w = weights[0]
        run.layers[layer] = mean_attention_distance(w).tolist()
        if keep == "all":
            for h in range(w.shape[0]):
                run.maps[(layer, h)] = pool_map(w[h], POOL_ALL)
        elif isinstance(keep, tuple) and keep[0] == layer:
            if not 0 <= keep[1] < w.shape[0]:
                raise QKRestoreError(f"--head {keep[1]}: layer {layer} has {w.shape[0]} heads")
            run.maps[keep] = pool_map(w[keep[1]], POOL_EXPLICIT)

    t0 = time.perf_counter()
    modules = _attention_modules(model, layers)
    with torch.inference_mode(), forward_errors(path, device, prompt.ids.numel()):
        if modules is not None:
            handles = []
            for layer, module, index in modules:

                def hook(mod, args, output, layer=layer, index=index):
                    w = output[index] if isinstance(output, tuple) else None
                    reduce(layer, w)

                handles.append(module.register_forward_hook(hook))
            try:
                model(input_ids=ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
        else:
            run.mode = "output_attentions"
            out = model(input_ids=ids, use_cache=False, output_attentions=True)
            pairs = layer_attentions(out, config, layers, str(path))
            for layer, w in pairs:
                reduce(layer, w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    run.seconds = time.perf_counter() - t0
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


# -- comparing models -----------------------------------------------------------------------------


def compare_runs(a: ModelRun, b: ModelRun) -> list[dict[str, Any]]:
    """Per layer: how many heads' D_h fell and rose from ``a`` to ``b``, and the mean change."""
    out = []
    for layer in sorted(set(a.layers) & set(b.layers)):
        da, db = a.layers[layer], b.layers[layer]
        if len(da) != len(db):
            raise QKRestoreError(
                f"layer {layer}: {len(da)} heads in {a.path} but {len(db)} in {b.path}"
            )
        diffs = [y - x for x, y in zip(da, db)]
        out.append(
            {
                "layer": layer,
                "kind": a.kinds.get(layer, "global"),
                "heads": len(da),
                "fell": sum(1 for d in diffs if d < 0),
                "rose": sum(1 for d in diffs if d > 0),
                "mean_change": sum(diffs) / len(diffs) if diffs else 0.0,
            }
        )
    return out


def most_affected(a: ModelRun, b: ModelRun) -> tuple[int, int] | None:
    """The paper's pick: the layer with most heads whose D_h fell, and its head that fell most."""
    rows = compare_runs(a, b)
    if not rows:
        return None
    best = max(rows, key=lambda r: (r["fell"], -r["mean_change"]))
    layer = best["layer"]
    drops = [x - y for x, y in zip(a.layers[layer], b.layers[layer])]
    return layer, max(range(len(drops)), key=lambda h: drops[h])


def attn_distance_report(runs: list[ModelRun], prompt: NeedlePrompt) -> dict[str, Any]:
    """The ``attn-distance`` JSON: distances per model, and fell/rose counts per consecutive pair."""
    comparisons = []
    for i in range(1, len(runs)):
        rows = compare_runs(runs[i - 1], runs[i])
        comparisons.append(
            {
                "from": i - 1,
                "to": i,
                "layers": rows,
                "ranking": [
                    r["layer"]
                    for r in sorted(rows, key=lambda r: (-r["fell"], r["mean_change"], r["layer"]))
                ],
            }
        )
    return {
        "prompt": prompt.to_json(),
        "models": [r.to_json() for r in runs],
        "comparisons": comparisons,
    }


# -- the command ----------------------------------------------------------------------------------


def prompt_for(config: dict[str, Any], where: str, length: int, depth: float, seed: int) -> Any:
    """The needle prompt for a model of this config: random tokens of its vocabulary, never its
    special tokens (BOS first when it has one)."""
    cfg = text_config(config)
    vocab = cfg.get("vocab_size")
    if not isinstance(vocab, int) or vocab <= 0:
        raise QKRestoreError(f"{where}/config.json: no 'vocab_size'")
    specials: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key, config.get(key))
        specials.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
    bos = cfg.get("bos_token_id", config.get("bos_token_id"))
    return needle_prompt(
        vocab,
        length,
        depth,
        seed,
        exclude=sorted(specials),
        bos=bos if isinstance(bos, int) else None,
    )


def attn_distance(
    models: Sequence[Path],
    *,
    length: int = 8192,
    depth: float = 0.5,
    device: str = "auto",
    dtype: str = "auto",
    layer: int | None = None,
    head: int | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    plot: Path | None = None,
    note: Callable[[str], None] = lambda message: None,
    on_model: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """The ``attn-distance`` command: D_h per head of every model on one needle prompt, fell/rose
    counts between consecutive models, and (with ``plot``) the four-panel attention-map figure of
    one head (the given ``layer``/``head``, else the paper's pick: the layer with most heads whose
    D_h fell from the first model to the second). ``note`` gets notes; ``on_model`` a line as
    each model starts to run."""
    from ..io.runtime import choose_device

    if not models:
        raise QKRestoreError("attn-distance: name at least one model folder")
    if length < 32:
        raise QKRestoreError(f"--length {length}: give at least 32 tokens")
    if not 0.0 <= depth <= 1.0:
        raise QKRestoreError(f"--depth {depth}: give a number in 0..1")
    if (layer is None) != (head is None):
        raise QKRestoreError("--layer and --head go together")
    if plot is not None:
        from ..io.plots import check_target

        check_target(plot)
    for m in models:
        if not Path(m).is_dir():
            raise QKRestoreError(f"{m}: not a model folder")
    config = read_config(Path(models[0]))
    layers, _, notes = softmax_layers(config)
    for n in notes:
        note(n)
    if layer is not None and layer not in layers:
        raise QKRestoreError(f"--layer {layer}: not a softmax-attention layer (those are {layers})")
    prompt = prompt_for(config, str(models[0]), length, depth, seed)
    dev, dt = choose_device(device, dtype)
    keep: Any = None
    if plot is not None:
        keep = (layer, head) if layer is not None else "all"
    runs = []
    for m in models:
        on_model(f"running {m} on {dev} ({length} tokens) …")
        runs.append(run_model(Path(m), prompt, dev, dt, keep, trust_remote_code))
    report = attn_distance_report(runs, prompt)
    report.update(
        {"length": length, "depth": depth, "seed": seed, "device": str(dev)}
        | {"dtype": str(dt).removeprefix("torch.")}
    )
    if plot is not None:
        from ..io.plots import attention_figure

        if layer is None or head is None:
            picked = most_affected(runs[0], runs[1]) if len(runs) > 1 else (layers[0], 0)
            layer, head = picked if picked else (layers[0], 0)
        if (layer, head) not in runs[0].maps:
            raise QKRestoreError(f"--head {head}: not a head of layer {layer}")
        names = (
            ["PRE", "POST", "restored"]
            if len(runs) == 3
            else ["PRE", "POST"]
            if len(runs) == 2
            else [Path(m).name for m in models]
        )
        attention_figure(
            [r.maps[(layer, head)].numpy() for r in runs],
            names,
            layer,
            head,
            length,
            prompt.needle,
            plot,
        )
        report["plot"] = {"file": str(plot), "layer": layer, "head": head}
    return report
