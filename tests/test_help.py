"""Every ``--help`` page reads cleanly at 80 columns: a usage line naming the arguments, no type
noise on flags, option names and choices in full, nothing past the edge, examples line for line.

Rendered with the Typer installed; the pages are laid out by qkrestore itself, so the oldest and
newest Typer that pyproject.toml allows render them alike (checked by hand with both ends).
"""

from __future__ import annotations

import io
import re

import pytest
import typer.main

from qkrestore.cli import app

GROUP = typer.main.get_command(app)
COMMANDS = sorted(GROUP.commands)  # type: ignore[attr-defined]


def examples(epilog: str | None) -> list[str]:
    """The example commands of an epilog, without their comments, spaces collapsed."""
    found = []
    for line in (epilog or "").splitlines():
        if line.strip().startswith("qkrestore "):
            found.append(" ".join(re.sub(r"\s{2,}#.*$", "", line).split()))
    return found


def shown_commands(page: str) -> set[str]:
    """The commands a page shows, with `` \\`` continuations joined, comment lines dropped."""
    joined = re.sub(r" \\\n\s+", " ", page)
    return {
        " ".join(line.split()) for line in joined.splitlines() if not line.strip().startswith("#")
    }


@pytest.fixture
def help_page(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")

    def render(*args: str) -> str:
        res = cli(*args, "--help")
        assert res.code == 0, res.err
        return res.out

    return render


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_reads_cleanly_at_80_columns(help_page, name: str) -> None:
    page = help_page(*([name] if name else []))
    lines = page.splitlines()
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    usage = lines[0]
    assert usage.startswith("Usage: ") and not re.search(r"\{\w+\}", usage), usage
    assert not re.search(r"<(bool|str|int|float|path)\b[^>]*>", page)  # typer 0.29's type column
    assert "…" not in page and not re.search(
        r"-[\w-]*[^.]\.\.\.(?!\w)", page.replace("[ARGS]...", "")
    )
    if not name:
        for command in COMMANDS:
            assert re.search(rf"^  {re.escape(command)}\s", page, re.M), command
        return
    command = GROUP.commands[name]  # type: ignore[attr-defined]
    for param in command.params:
        if param.param_type_name == "argument":
            assert f" {param.metavar or param.name.upper()}" in usage
            continue
        for opt in [*param.opts, *param.secondary_opts]:
            assert re.search(rf"(^|[ ,/]){re.escape(opt)}([ ,]|$)", page, re.M), opt
        if getattr(param, "is_flag", False):  # a flag takes no value: nothing follows its names
            long_name = max(param.opts, key=len)
            line = next(
                x for x in lines if re.search(rf"^ +(-\w, )?{re.escape(long_name)}(?=[ ,]|$)", x)
            )
            after = line.split(long_name, 1)[1]
            assert after == "" or after.startswith(("  ", " / ")), line
    shown = shown_commands(page)
    for example in examples(command.epilog):
        assert example in shown, example


def test_usage_names_arguments_and_choices_in_full(help_page) -> None:
    merge = help_page("merge")
    assert merge.splitlines()[0].endswith("merge [OPTIONS] PRE POST")
    assert re.search(r"^  --mla-latent \[post\|pre\]  ", merge, re.M)
    assert re.search(r"^  --dry-run {2,}Print the plan", merge, re.M)
    assert re.search(r"^  -o, --output PATH {2,}Folder to create\.", merge, re.M)
    sweep = help_page("sweep")
    assert re.search(r"^  --dtype \[auto\|float32\|bfloat16\|float16\]$", sweep, re.M)
    assert re.search(r"^  --trust-remote-code {2,}Let transformers", sweep, re.M)


def test_a_usage_error_names_the_arguments(cli, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    res = cli("merge", "only-pre")
    assert res.code == 2
    assert "merge [OPTIONS] PRE POST" in res.err and "{" not in res.err


def test_a_flag_takes_no_value(cli, tmp_path) -> None:
    """The help shows no value for a flag, and the parser agrees: ``--dry-run true`` is refused."""
    res = cli("merge", tmp_path / "a", tmp_path / "b", "-o", tmp_path / "o", "--dry-run", "true")
    assert res.code == 2 and "true" in res.err


def test_sweep_table_keeps_its_metric_headers_and_values_at_80_columns() -> None:
    """Three recall lengths, reasoning and lm-eval beside long candidate names: every header and
    every number reads in full at 80 columns (names and layer lists fold instead)."""
    from rich.console import Console

    from qkrestore.cli.sweep import sweep_table as _sweep_table

    names = ["PRE", "POST", "QK-Restore (all)", "QK-Restore layer 11", "top-2 QK-Restore",
             "QK-Pro R=0.1", "QK-Pro cross-gram"]  # fmt: skip
    rows = [
        {
            "name": n,
            "planned_layers": [3, 7, 11, 15, 19][: i % 5],
            "recall": {"4096": 0.5, "8192": 0.25, "16384": 0.125},
            "recall_mean": 0.875,
            "reasoning_score": 0.9125,
            "lm_eval_score": 0.4375,
            "pareto": n == "PRE",
        }
        for i, n in enumerate(names)
    ]
    report = {
        "candidates": rows,
        "post": "./sft",
        "recall_source": "niah single-2",
        "reasoning_metric": "answer",
        "pick": {"name": "QK-Pro R=0.1"},
    }
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(_sweep_table(report))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "…" not in text
    header = "\n".join(lines[:6])
    for word in (
        "candidate",
        "layers",
        "@4096",
        "@8192",
        "@16384",
        "recall",
        "reasoning",
        "lm-eval",
    ):
        assert re.search(rf"(^|\s){re.escape(word)}(\s|$)", header, re.M), word
    value_rows = [line for line in lines if "0.500" in line]
    assert len(value_rows) == len(names)
    for line in value_rows:
        assert re.search(r"0\.500\s+0\.250\s+0\.125\s+0\.875\s+0\.912\s+0\.438", line), line
    assert any("★" in line and "PRE" in line for line in value_rows)
    assert any("←" in line for line in value_rows)
