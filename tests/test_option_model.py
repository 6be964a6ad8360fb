"""The one option model: ``merge``/``pro``'s CLI flags, API keywords and recipe keys come from the
fields of PlanOptions, WriteOptions, JobOptions and ProOptions, with each default written once.

A field added to one of those dataclasses must reach all three front ends without another edit;
the API with ``recipe=`` must write what ``--config`` writes; library errors name options as the API
spells them, and only the CLI spells them as flags.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
from conftest import QWEN3_NEXT, build_hf_pair, sha
from typer.testing import CliRunner

import qkrestore
import qkrestore.options as model
from qkrestore.api import MergeArgs, ProArgs
from qkrestore.cli import app, surgery
from qkrestore.cli.options import option_parameters
from qkrestore.errors import OptionError, QKRestoreError
from qkrestore.surgery.plan import PlanOptions
from qkrestore.surgery.writer import WriteOptions

CLI_ONLY = {"output", "config", "verbose", "json_out", "quiet", "pre", "post", "ctx"}
TYPED_ARGS = {"merge": MergeArgs, "pro": ProArgs}

# A value other than the default for every option, as a recipe (YAML) would hold it.
NON_DEFAULT = {
    "layers": [1, 3],
    "include_sliding": True,
    "targets": ["q"],
    "allow_arch_mismatch": True,
    "tensor_pattern": "model\\.layers\\.{i}\\.q",
    "mla_latent": "pre",
    "carry_missing": True,
    "dry_run": True,
    "expect_layers": [1, 3],
    "overwrite": True,
    "link": True,
    "jobs": 5,
    "push_to_hub": "me/model",
    "private": True,
    "revision": "exp",
    "pre_id": "org/base",
    "post_id": "org/sft",
    "record_paths": True,
    "pre_weights": "model.safetensors",
    "post_weights": "model.safetensors.index.json",
    "merge_adapter": True,
    "fix": "query",
    "ridge": 0.25,
    "form": "cross-gram",
    "device": "cpu",
}


def command_params(name: str) -> dict[str, list[str]]:
    cmd = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return {p.name: list(p.opts) for p in cmd.params}


@pytest.fixture
def fresh_model():
    """Rebuild the model's cached specs around a test that changes a dataclass."""
    model.all_specs.cache_clear()
    yield
    model.all_specs.cache_clear()


@pytest.mark.parametrize("command", ["merge", "pro"])
def test_flags_keywords_and_recipe_keys_are_one_set(command: str, tmp_path: Path) -> None:
    keys = {s.key for s in model.specs(command)}
    # CLI: every option is a parameter of the command, with the model's flags
    params = command_params(command)
    assert set(params) - CLI_ONLY == keys
    for spec in model.specs(command):
        assert params[spec.key] == list(spec.flags), spec.key
    # API: the typed keywords are exactly the model's (no list of names to keep by hand)
    assert set(TYPED_ARGS[command].__optional_keys__) == keys
    # recipes: one file may set every option, and each value reaches its field
    recipe = tmp_path / "all.yaml"
    recipe.write_text(json.dumps({k: NON_DEFAULT[k] for k in keys}))  # JSON is YAML
    chosen = model.resolve(command, tmp_path / "out", {}, recipe=recipe)
    for spec in model.specs(command):
        owner = {
            PlanOptions: chosen.plan,
            WriteOptions: chosen.job.write,
            model.ProOptions: chosen.pro,
        }.get(spec.owner, chosen.job)
        assert getattr(owner, spec.field) != spec.default, spec.key
    # and the API takes every key as a keyword, with the same result as the recipe
    assert model.resolve(command, tmp_path / "out", {k: NON_DEFAULT[k] for k in keys}) == chosen


def test_a_field_added_to_a_dataclass_reaches_cli_api_and_recipe(
    fresh_model, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    @dataclass(frozen=True)
    class Extended(PlanOptions):
        shuffle_heads: bool = field(
            default=False,
            metadata={"flags": ("--shuffle-heads",), "help": "A field this test adds."},
        )

    monkeypatch.setattr(model, "PlanOptions", Extended)
    model.all_specs.cache_clear()
    for command in ("merge", "pro"):
        assert "shuffle_heads" in {p.name for p in option_parameters(command)}
    # the CLI: the merge command built from the model parses the new flag into the option objects
    seen = []
    extended_app = typer.Typer()
    extended_app.command("merge")(surgery._with_options("merge")(lambda *a: seen.append(a[2])))
    extended_app.command("other")(lambda: None)  # keep "merge" a subcommand
    res = CliRunner().invoke(extended_app, ["merge", "a", "b", "-o", "o", "--shuffle-heads"])
    assert res.exit_code == 0, res.output
    assert seen[0].plan.shuffle_heads is True
    # the API keyword
    assert model.resolve("merge", "o", {"shuffle_heads": True}).plan.shuffle_heads is True
    # the recipe key
    recipe = tmp_path / "r.yaml"
    recipe.write_text("shuffle-heads: true\n")
    assert model.resolve("pro", "o", {}, recipe=recipe).plan.shuffle_heads is True


def test_jobs_default_comes_from_one_place(tmp_path: Path) -> None:
    written_once = WriteOptions().jobs
    cmd = typer.main.get_command(app).commands["merge"]  # type: ignore[attr-defined]
    cli_default = next(p.default for p in cmd.params if p.name == "jobs")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# no options\n")
    api_default = model.resolve("merge", "o", {}).job.write.jobs
    recipe_absent = model.resolve("pro", "o", {}, recipe=empty).job.write.jobs
    assert cli_default == api_default == recipe_absent == written_once
    # the API documents the same default, read from the model
    assert f"jobs (default {written_once!r})" in (qkrestore.merge.__doc__ or "")


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_hf_pair(tmp_path_factory.mktemp("model"), "qwen3_next", QWEN3_NEXT)


def test_api_recipe_writes_what_cli_config_writes(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    recipe = tmp_path / "pick.yaml"
    recipe.write_text("layers: [3]\ntargets: [q]\njobs: 1\n")
    res = cli("merge", pre, post, "-o", tmp_path / "cli", "--config", recipe, "--json")
    assert res.code == 0, res.err
    result = qkrestore.merge(pre, post, tmp_path / "api", recipe=recipe)
    assert result.plan.layers == [3] == json.loads(res.out)["layers"]
    assert {p.target for p in result.plan.patches} == {"q"}
    shards = sorted(f.name for f in post.glob("*.safetensors"))
    assert shards
    for name in shards:
        assert sha(tmp_path / "api" / name) == sha(tmp_path / "cli" / name), name
    # a keyword overrides the recipe, as a flag does; the recipe's other keys still hold
    result = qkrestore.merge(pre, post, tmp_path / "api2", recipe=recipe, layers=[1])
    res = cli("merge", pre, post, "-o", tmp_path / "cli2", "--config", recipe, "--layers", "1")
    assert res.code == 0, res.err
    assert result.plan.layers == [1] and {p.target for p in result.plan.patches} == {"q"}
    for name in shards:
        assert sha(tmp_path / "api2" / name) == sha(tmp_path / "cli2" / name), name
    assert [sha(tmp_path / "api2" / n) for n in shards] != [
        sha(tmp_path / "api" / n) for n in shards
    ]


def test_library_errors_name_options_the_cli_names_flags(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    with pytest.raises(QKRestoreError) as info:
        qkrestore.merge(pre, post, tmp_path / "out", layers=[99])
    assert isinstance(info.value, OptionError) and info.value.option == "layers"
    assert str(info.value).startswith("layers: layer 99") and "--layers" not in str(info.value)
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--layers", "99")
    assert res.code == 2 and res.err_lines == [f"error: --{info.value!s}"], res.err
    # an option mentioned inside a message is spelled as a flag by the CLI only
    with pytest.raises(OptionError) as info:
        qkrestore.merge(pre, post, tmp_path / "out", tensor_pattern="x")
    assert "`layers`" in str(info.value) and "--" not in str(info.value)
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--tensor-pattern", "x")
    assert res.code == 2 and "--tensor-pattern: needs explicit --layers" in res.err
    # a bad value of an API keyword is an option error naming it, before anything is opened
    with pytest.raises(OptionError, match=r"^jobs: 0: must be ≥ 1$"):
        qkrestore.merge("no-such-pre", "no-such-post", tmp_path / "out", jobs=0)
    with pytest.raises(OptionError, match=r"^form: 'lasso'"):
        qkrestore.pro("no-such-pre", "no-such-post", tmp_path / "out", form="lasso")
    # an option of the other command says which command takes it
    with pytest.raises(OptionError, match=r"qkrestore\.pro"):
        qkrestore.merge(pre, post, tmp_path / "out", fix="key")  # type: ignore[call-arg]
    assert not (tmp_path / "out").exists()


def test_typed_api_keywords_match_the_model_types() -> None:
    """The TypedDicts are for type checkers; each key's type admits the field's default."""
    for command, typed in TYPED_ARGS.items():
        hints = typing.get_type_hints(typed)
        for spec in model.specs(command):
            assert spec.key in hints, spec.key
