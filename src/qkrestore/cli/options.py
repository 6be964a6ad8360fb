"""Every shared command-line option and enum, as ``Annotated`` types, and the recipe loader hook.

Commands declare their parameters with these types, so an option reads the same (name, help,
bounds) in every command that takes it.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from ..adapters.shared import MLA_LATENT
from ..recipes import load_recipe


class MlaLatent(str, Enum):
    post = "post"
    pre = "pre"

    def adapter_options(self) -> dict[str, str]:
        """The planning option the Kimi adapter reads (named once, in the adapter)."""
        return {MLA_LATENT: self.value} if self is MlaLatent.pre else {}


def _recipe_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    """Load a recipe as defaults for this command; options given on the command line still win."""
    if value is not None:
        params = [(p.name, getattr(p, "opts", [])) for p in ctx.command.params]
        ctx.default_map = {**(ctx.default_map or {}), **load_recipe(value, params)}
    return value


PreArg = Annotated[
    str,
    typer.Argument(
        help="Pre-SFT checkpoint (routing source): a folder, org/name, org/name@revision or hf://org/name."
    ),
]
PostArg = Annotated[
    str,
    typer.Argument(
        help="Post-SFT checkpoint (everything else): a folder, org/name, org/name@revision or hf://org/name."
    ),
]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder to create.")]
ExpectOpt = Annotated[
    str | None,
    typer.Option(
        "--expect-layers",
        help="Refuse to run unless the planned layers are exactly these (recipes use it as a check).",
    ),
]
PushOpt = Annotated[
    str | None,
    typer.Option("--push-to-hub", help="After success, upload OUT to this Hub repo id."),
]
CarryMissingOpt = Annotated[
    bool,
    typer.Option(
        "--carry-missing",
        help="Also copy, byte for byte, the tensors PRE has and POST lacks (e.g. mtp.* heads or a "
        "vision tower a trainer's save dropped) into OUT, as an extra shard in its index.",
    ),
]
PreIdOpt = Annotated[
    str | None,
    typer.Option(
        "--pre-id",
        help="Hub id to name PRE by in the model card's base_model, when it is a local folder "
        "that the tool cannot tie to one (found from the HF cache or config otherwise).",
    ),
]
PostIdOpt = Annotated[
    str | None,
    typer.Option("--post-id", help="Hub id to name POST by in the model card (see --pre-id)."),
]
RecordPathsOpt = Annotated[
    bool,
    typer.Option(
        "--record-paths",
        help="Keep the sources' absolute local paths in qkrestore.json and the recorded command "
        "(by default only Hub ids and folder names are written, so a push leaks no local paths).",
    ),
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repo as private.")]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="Hub branch to push to (created if needed)."),
]
RecipeOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A YAML recipe holding any of these options (see configs/); command-line options win.",
        is_eager=True,
        callback=_recipe_callback,
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also print the plan table.")]


LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        help="'auto' (every global softmax-attention layer) or 0-based indices, e.g. 3,7,11 or 3-7.",
    ),
]
SlidingOpt = Annotated[
    bool,
    typer.Option(
        "--include-sliding",
        help="With --layers auto, also restore local (sliding) layers.",
    ),
]
TargetsOpt = Annotated[
    str,
    typer.Option(
        "--targets",
        help="Projections to restore: comma list of q,k,v,o (v/o are ablations).",
    ),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace OUT if it exists (only once the new one is complete).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")]
ArchOpt = Annotated[
    bool,
    typer.Option(
        "--allow-arch-mismatch",
        help="Plan from POST's config even if PRE's names another family or layer map.",
    ),
]
PatternOpt = Annotated[
    str | None,
    typer.Option(
        "--tensor-pattern",
        help="For families qkrestore does not know: a regular expression for the tensors to "
        "restore whole, with {i} standing for the layer index; needs explicit --layers.",
    ),
]
MlaLatentOpt = Annotated[
    MlaLatent,
    typer.Option(
        "--mla-latent",
        help="MLA layers (Kimi Linear): also take the latent rows of kv_a_proj_with_mqa and "
        "kv_a_layernorm, which V shares, from PRE ('pre'), or keep POST's ('post', default).",
    ),
]
PreWeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--pre-weights",
        help="Where PRE holds two weight sets: the one to read (model.safetensors or an index).",
    ),
]
PostWeightsOpt = Annotated[
    str | None,
    typer.Option(
        "--post-weights",
        help="Where POST holds two weight sets: the one to restore (model.safetensors or an "
        "index); OUT holds only that one.",
    ),
]
JobsOpt = Annotated[int, typer.Option("--jobs", "-j", min=1, help="Files copied in parallel.")]
LinkOpt = Annotated[
    bool,
    typer.Option(
        "--link",
        help="Hard-link untouched shards instead of copying (they then share storage with POST).",
    ),
]


class FixSide(str, Enum):
    key = "key"
    query = "query"


class DeviceChoice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class ForwardMode(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class InputKind(str, Enum):
    auto = "auto"
    ids = "ids"
    text = "text"


class Task(str, Enum):
    single_1 = "single-1"
    single_2 = "single-2"
    single_3 = "single-3"


FixOpt = Annotated[
    FixSide,
    typer.Option("--fix", help="Side held at PRE: 'key' solves W_Q, 'query' solves W_K."),
]
RidgeOpt = Annotated[
    float,
    typer.Option(
        "--ridge",
        min=0.0,
        help="Relaxation R ≥ 0 (λ = R·trace(G)/d_h): 0 gives QK-Restore, large R gives POST.",
    ),
]
FormOpt = Annotated[
    str,  # checked by the planner, so a wrong value gets the one-line error
    typer.Option(
        "--form",
        help="'ridge' (default): the ridge-relaxed bilinear form; 'cross-gram': keep PRE's "
        "d_h×d_h cross-Gram Q_h K_gᵀ exactly, with the smallest change (ignores --ridge).",
    ),
]
SolveDeviceOpt = Annotated[
    DeviceChoice,
    typer.Option("--device", help="Where to solve: auto (CUDA if present), cpu, cuda."),
]
ForwardOpt = Annotated[
    ForwardMode,
    typer.Option(
        "--forward",
        help="Load OUT in transformers and run one forward pass: auto (models ≤ 2 GiB), "
        "always, never.",
    ),
]
DeviceOpt = Annotated[
    DeviceChoice, typer.Option("--device", help="auto (CUDA when present), cpu or cuda.")
]
DTypeOpt = Annotated[
    DType,
    typer.Option("--dtype", help="Model dtype: auto is bfloat16 on CUDA and float32 on the CPU."),
]
PlotOpt = Annotated[
    Path | None,
    typer.Option(
        "--plot", help="Also draw a PNG figure here (needs the 'plot' extra: matplotlib)."
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the synthetic prompt(s).")]
RemoteOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let transformers run the model folder's own Python code (remote-code families such "
        "as HypeNet). Off by default: that code runs with your permissions.",
    ),
]
MergeAdapterOpt = Annotated[
    bool,
    typer.Option(
        "--merge-adapter",
        help="When POST is a PEFT adapter: write a full checkpoint (PRE + adapter merged) instead "
        "of an adapter.",
    ),
]
