"""The demo's tables read at 80 columns: no cell wraps onto more lines than a wide terminal shows."""

from __future__ import annotations

import pytest
from rich.console import Console
from rich.table import Table

import qkrestore
from qkrestore.cli.checks import drift_table, routing_table
from qkrestore.cli.demo import build_demo_pair
from qkrestore.cli.output import plan_table
from qkrestore.io.checkpoint import Checkpoint
from qkrestore.surgery.plan import build_plan


def rendered_lines(table: Table, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(table)
    return console.export_text().splitlines()


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Table]:
    pre, post = build_demo_pair(tmp_path_factory.mktemp("demo"))
    report = qkrestore.inspect_layers(post, compare_with=pre)
    with Checkpoint.open(pre) as a, Checkpoint.open(post) as b:
        plan = build_plan(a, b)
    return {
        "routing": routing_table(report),
        "drift": drift_table(report),
        "plan": plan_table(plan),
    }


@pytest.mark.parametrize("name", ["routing", "drift", "plan"])
def test_demo_tables_fit_80_columns(tables: dict[str, Table], name: str) -> None:
    wide = rendered_lines(tables[name], 300)
    narrow = rendered_lines(tables[name], 80)
    assert all(len(line) <= 80 for line in narrow)
    # One line per row at 80 columns, as on a wide terminal: nothing was folded.
    assert len(narrow) == len(wide), "\n".join(narrow)
    assert tables[name].row_count > 0
