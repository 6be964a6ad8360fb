"""Every shared command-line option and enum, as ``Annotated`` types, and the recipe loader hook.

Commands declare their parameters with these types, so an option reads the same (name, help,
bounds) in every command that takes it. The options of ``merge`` and ``pro`` are not declared here:
:func:`option_parameters` builds them from the option model (:mod:`qkrestore.options`), and
:func:`option_type` gives one of them to other commands (``sweep`` takes ``--layers`` too).
"""

from __future__ import annotations

import inspect
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer

from ..options import OptionSpec, spec_by_key, specs
from ..surgery.recipes import load_recipe


def _recipe_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    """Load a recipe as defaults for this command; options given on the command line still win.

    For commands outside the option model (``sweep``); ``merge``/``pro`` read theirs through
    :func:`qkrestore.options.resolve`, as the API does."""
    if value is not None:
        params = [(p.name, getattr(p, "opts", [])) for p in ctx.command.params]
        ctx.default_map = {**(ctx.default_map or {}), **load_recipe(value, params)}
    return value


@cache
def _choice_enum(key: str, choices: tuple[str, ...]) -> type[Enum]:
    """The Enum typer offers as a choice list for an option with fixed ``choices``."""
    return Enum(key.title().replace("_", ""), [(c.replace("-", "_"), c) for c in choices], type=str)  # type: ignore[return-value]


def _annotated(spec: OptionSpec) -> tuple[Any, Any]:
    """(Annotated type, default) of one option as a typer parameter."""
    base: Any = spec.kind
    default = spec.cli_default
    if spec.cli_enum:
        base = _choice_enum(spec.key, spec.choices)
        default = base(default)
    if default is None:
        base = base | None
    option = typer.Option(*spec.flags, help=spec.help, min=spec.minimum)
    return Annotated[base, option], default


def option_type(key: str) -> Any:
    """The ``Annotated`` type of option ``key`` of the option model, for a command's signature."""
    return _annotated(spec_by_key()[key])[0]


def option_parameters(command: str) -> list[inspect.Parameter]:
    """The typer parameters of ``command``'s options (keyword-only, named by their keys)."""
    kw = inspect.Parameter.KEYWORD_ONLY
    out = []
    for spec in specs(command):
        annotation, default = _annotated(spec)
        out.append(inspect.Parameter(spec.key, kw, default=default, annotation=annotation))
    return out


def cli_value(value: Any) -> Any:
    """A typer value as the option model takes it (choices arrive as Enum members)."""
    return value.value if isinstance(value, Enum) else value


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
RecipeOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="A YAML recipe holding any of these options (see configs/); command-line options win.",
        is_eager=True,
        callback=_recipe_callback,
    ),
]
ConfigOpt = Annotated[  # merge/pro: the recipe is read with the options, as the API reads it
    Path | None,
    typer.Option(
        "--config",
        help="A YAML recipe holding any of these options (see configs/); command-line options win.",
    ),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Also print the plan table.")]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or notes; errors only.")]


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


# Options of the model that other commands take too (same flags, help and checks).
LayersOpt = option_type("layers")
SlidingOpt = option_type("include_sliding")
ArchOpt = option_type("allow_arch_mismatch")
PreWeightsOpt = option_type("pre_weights")
PrivateOpt = option_type("private")
RevisionOpt = option_type("revision")


class DeviceMap(str, Enum):
    auto = "auto"


class Scoring(str, Enum):
    forced = "forced"
    generate = "generate"


DeviceMapOpt = Annotated[
    DeviceMap | None,
    typer.Option(
        "--device-map",
        help="Spread a model too large for one GPU over all GPUs, then the CPU (accelerate).",
    ),
]
BeyondOpt = Annotated[
    bool,
    typer.Option("--beyond-context", help="Allow --lengths past max_position_embeddings."),
]
ScoringOpt = Annotated[
    Scoring,
    typer.Option(
        "--scoring",
        help="NIAH answers: forced = one teacher-forced pass (the greedy answer starts with the "
        "value); generate = greedy generation searched whole.",
    ),
]
