"""Recipes are untrusted input (issue 22, classes 4 and 5, recipe parts).

A recipe of a few hundred bytes must not expand into billions of entries (YAML anchors and aliases
are refused), values must be scalars or lists of scalars, and a recipe meant for the other command
says which command to run, in one line, exit 2, naming the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import qkrestore
from qkrestore.errors import RecipeError
from qkrestore.surgery.recipes import MAX_RECIPE_BYTES

# The shape of the audit's 519-byte recipe, kept small: each level repeats the one before.
LAUGHS = """\
a: &a [x, x, x]
b: &b [*a, *a, *a]
c: &c [*b, *b, *b]
layers: *c
"""


def one_line(res, *needles: str) -> None:
    assert res.code == 2, (res.code, res.out, res.err)
    assert len(res.err_lines) == 1 and res.err_lines[0].startswith("error:"), res.err
    assert "Traceback" not in res.err
    for needle in needles:
        assert needle in res.err, (needle, res.err)


@pytest.mark.parametrize("command", ["merge", "pro"])
def test_nested_aliases_are_refused(tmp_path: Path, cli, command: str) -> None:
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(LAUGHS)
    res = cli(command, "pre", "post", "-o", tmp_path / "out", "--config", recipe)
    one_line(res, str(recipe), "anchors and aliases")
    assert not (tmp_path / "out").exists()


def test_a_single_alias_is_refused_too(tmp_path: Path) -> None:
    recipe = tmp_path / "alias.yaml"
    recipe.write_text("expect_layers: &l [1, 2]\nlayers: *l\n")
    with pytest.raises(RecipeError, match="line 1: YAML anchors and aliases"):
        qkrestore.merge("pre", "post", tmp_path / "out", recipe=recipe)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("layers: [{a: 1}]\n", "a list holding a mapping"),
        ("targets: [[q, k]]\n", "a list holding a list"),
        ("layers: {from: 1, to: 3}\n", "a mapping"),
    ],
)
def test_values_must_be_scalars(tmp_path: Path, cli, text: str, what: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    key = text.split(":")[0]
    res = cli("merge", "pre", "post", "-o", tmp_path / "out", "--config", recipe)
    one_line(res, str(recipe), f"recipe key '{key}'", what)
    with pytest.raises(RecipeError, match=what):
        qkrestore.merge("pre", "post", tmp_path / "out", recipe=recipe)


def test_an_oversized_recipe_is_refused(tmp_path: Path, cli) -> None:
    recipe = tmp_path / "big.yaml"
    recipe.write_text("layers: auto\n" + "#" * MAX_RECIPE_BYTES + "\n")
    res = cli("merge", "pre", "post", "-o", tmp_path / "out", "--config", recipe)
    one_line(res, str(recipe), "not a recipe")


def test_a_bad_value_names_the_recipe_and_its_key(tmp_path: Path, cli) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("jobs: many\n")
    res = cli("merge", "pre", "post", "-o", tmp_path / "out", "--config", recipe)
    one_line(res, f"{recipe}: jobs: 'many': give a number")  # the recipe's key, not --jobs


def test_a_pro_recipe_given_to_merge_names_pro(tmp_path: Path, cli) -> None:
    recipe = tmp_path / "pick.yaml"  # what `sweep --write-recipe` writes for a QK-Pro pick
    recipe.write_text(
        "# use: qkrestore pro PRE POST -o OUT --config THIS_FILE\n"
        "layers: [1, 3]\nfix: key\nridge: 0.1\n"
    )
    res = cli("merge", "pre", "post", "-o", tmp_path / "out", "--config", recipe)
    one_line(res, str(recipe), "this is a QK-Pro recipe", "run `qkrestore pro`")
    assert "unknown" not in res.err
    with pytest.raises(RecipeError, match="run `qkrestore pro`"):
        qkrestore.merge("pre", "post", tmp_path / "out", recipe=recipe)


def test_a_merge_recipe_given_to_pro_names_merge(tmp_path: Path, cli) -> None:
    recipe = tmp_path / "pick.yaml"
    recipe.write_text("layers: [1, 3]\ntargets: [q, k, v]\n")
    res = cli("pro", "pre", "post", "-o", tmp_path / "out", "--config", recipe)
    one_line(res, str(recipe), "this is a QK-Restore recipe", "run `qkrestore merge`")


def test_an_unknown_key_is_named_in_api_and_cli(tmp_path: Path, cli) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("layerz: [1]\n")
    with pytest.raises(RecipeError, match="unknown recipe key 'layerz'"):
        qkrestore.pro("pre", "post", tmp_path / "out", recipe=recipe)
    res = cli("pro", "pre", "post", "-o", tmp_path / "out", "--config", recipe)
    one_line(res, str(recipe), "unknown recipe key 'layerz'")


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_recipes_pass_the_option_model(recipe: Path) -> None:
    from qkrestore.options import resolve

    for command in ("merge", "pro"):
        chosen = resolve(command, "out", {}, recipe=recipe)
        assert chosen.plan.layers is None  # every shipped recipe restores the auto set
        if recipe.stem != "template":
            assert chosen.job.expect_layers
