"""The command-line options merge and pro share, as ``Annotated`` types, and the recipe loader hook."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .recipes import load_recipe


class MlaLatent(str, Enum):
    post = "post"
    pre = "pre"


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


MergeAdapterOpt = Annotated[
    bool,
    typer.Option(
        "--merge-adapter",
        help="When POST is a PEFT adapter: write a full checkpoint (PRE + adapter merged) instead "
        "of an adapter.",
    ),
]
