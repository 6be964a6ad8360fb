"""Long measurements keep what they measured and say what they cannot tell.

* ``--json-out`` is rewritten after every candidate; Ctrl-C (a real SIGINT to a running process)
  leaves the candidates measured so far in it and exits 130, and ``--resume`` then gives the
  document an uninterrupted run gives (timings aside). A file from other settings is refused.
* Off a terminal, every candidate gets a plain progress line with its time and an ETA.
* Scores carry 95 % Wilson intervals, checked here against the interval's defining quadratic.
* When every candidate scores 0 the probe cannot decide: a note says so, the JSON says so, no
  Pareto star or pick is claimed, and no recipe is written without ``--force``.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_api_eval import untimed
from test_sweep import EXAMPLE, dense, one_thread  # noqa: F401 - fixtures

from qkrestore.evaluate.probe import Z95, at_chance, tied, wilson

FAST = ["--lengths", "128", "--samples", "2", "--task", "single-1", "--device", "cpu"]


def wilson_direct(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson bounds as the roots of n(p̂ − p)² = z² p(1 − p) (its definition)."""
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    disc = math.sqrt(max(0.0, b * b - 4 * a * c))
    return ((-b - disc) / (2 * a), (-b + disc) / (2 * a))


@pytest.mark.parametrize(("k", "n"), [(0, 10), (5, 10), (10, 10), (3, 24), (1, 2), (97, 100)])
def test_wilson_interval(k: int, n: int) -> None:
    lo, hi = wilson(k, n)
    want = wilson_direct(k, n)
    assert lo == pytest.approx(want[0], abs=1e-12) and hi == pytest.approx(want[1], abs=1e-12)
    assert 0 <= lo <= k / n <= hi <= 1
    assert pytest.approx(1.959963984540054) == Z95


def test_wilson_known_values_and_verdict_helpers() -> None:
    # 0 of 10: the upper bound is z²/(n + z²); 5 of 10: 0.5 ± 0.2634 (published tables)
    assert wilson(0, 10) == (0.0, pytest.approx(Z95**2 / (10 + Z95**2)))
    lo, hi = wilson(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert at_chance(0.0, 10) and not at_chance(0.1, 10)
    assert tied([[0.0, 0.3], [0.1, 0.5], [0.2, 0.9]])  # a point (0.2..0.3) in every interval
    assert not tied([[0.0, 0.3], [0.5, 0.9]]) and not tied([[0.0, 1.0]])


def test_sweep_reports_intervals(dense, cli) -> None:  # noqa: F811
    pre, post = dense
    res = cli(
        "sweep", pre, post, "--candidates", "post,restore", *FAST, "--reasoning", "example",
        "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    for r in json.loads(res.out)["candidates"]:
        assert r["recall_n"] == {"128": 2}
        lo, hi = wilson_direct(round(r["recall"]["128"] * 2), 2)
        assert r["recall_ci"]["128"] == [round(lo, 4), round(hi, 4)]
        assert r["recall_mean_ci"] == r["recall_ci"]["128"]  # one length: the same trials
        lo, hi = wilson_direct(round(r["reasoning"]["exact"] * 24), 24)
        assert r["reasoning"]["exact_ci"] == [round(lo, 4), round(hi, 4)]
    # the table shows the intervals and, off a terminal, one progress line per candidate
    lines = [x for x in res.err.splitlines() if re.match(r"^\[\d/2\] ", x)]
    assert len(lines) == 2 and re.match(r"^\[1/2\] post: \d+\.\d s, recall .*, ETA ", lines[0])
    assert lines[1].startswith("[2/2] qk-restore: ") and "ETA" not in lines[1]
    assert re.search(r"\d\.\d{3} \[\d\.\d\d,\d\.\d\d\]", res.err)


def test_select_layers_prints_progress_off_a_terminal(dense, cli) -> None:  # noqa: F811
    _, post = dense
    res = cli("select-layers", post, "--recall", EXAMPLE, "--device", "cpu")
    assert res.code == 0, res.err
    lines = [x for x in res.err.splitlines() if x.startswith("[")]
    assert [x.split(":")[0] for x in lines] == [
        "[1/4] unablated",
        "[2/4] layer 0",
        "[3/4] layer 1",
        "[4/4] layer 2",
    ]
    assert all(re.search(r": \d+\.\d s", x) for x in lines) and "ETA" in lines[0]


def zero_items(path: Path) -> Path:
    """Answers no random tiny model produces: 3 copies of an unused token id after the prompt."""
    lines = [{"prompt": [1, 5 + i, 9, 14], "answer": [0, 0, 0], "group": "x"} for i in range(6)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_probe_that_cannot_decide_writes_no_recipe(dense, tmp_path: Path, cli) -> None:  # noqa: F811
    pre, post = dense
    items = zero_items(tmp_path / "zero.jsonl")
    recipe = tmp_path / "pick.yaml"
    args = ["sweep", pre, post, "--candidates", "restore,single,ablations", "--recall", items]
    args += ["--device", "cpu", "--pick", "max recall", "--write-recipe", recipe]
    res = cli(*args, "--json")
    assert res.code == 2
    doc = json.loads(res.out)  # the measurements are still printed
    assert all(r["recall_mean"] == 0.0 for r in doc["candidates"]) and len(doc["candidates"]) == 7
    assert doc["probe"]["decides"] is False and "tied" in doc["probe"]["reasons"][0]
    assert doc["pick"]["decided"] is False and "recipe" not in doc["pick"]
    assert not recipe.exists()
    assert res.err_lines[-1].startswith("error: --write-recipe: the probe cannot decide")
    assert "note: the probe cannot decide" in res.err and "not picked" in res.err
    assert "★" not in res.err and "←" not in res.err  # no front, no pick claimed in the table
    forced = cli(*args, "--force", "--quiet")
    assert forced.code == 0, forced.err
    text = recipe.read_text()
    assert "although the probe cannot decide" in text and "layers: [0, 1, 2]" in text


def test_select_layers_that_cannot_decide_writes_no_recipe(dense, tmp_path: Path, cli) -> None:  # noqa: F811
    _, post = dense
    items = zero_items(tmp_path / "zero.jsonl")
    recipe = tmp_path / "top.yaml"
    args = ["select-layers", post, "--recall", items, "--top", "1", "--write-recipe", recipe]
    res = cli(*args, "--device", "cpu", "--json", "--quiet")
    assert res.code == 2 and "the probe cannot decide" in res.err and not recipe.exists()
    doc = json.loads(res.out)
    assert doc["probe"]["decides"] is False
    assert "the unablated model's recall is at chance (0 of 6 correct)" in doc["probe"]["reasons"]
    assert cli(*args, "--device", "cpu", "--force", "--quiet").code == 0 and recipe.exists()


def sweep_args(pre: Path, post: Path) -> list[str]:
    return [
        "sweep", str(pre), str(post), "--candidates", "post,restore,single,ablations,pro",
        "--ridges", "1", "--lengths", "128", "--samples", "2", "--task", "single-1",
        "--reasoning", "example", "--device", "cpu",
    ]  # fmt: skip


def read_done(path: Path) -> list[str]:
    try:
        return [r["name"] for r in json.loads(path.read_text())["candidates"]]
    except (OSError, ValueError, KeyError):
        return []


def test_interrupt_then_resume_equals_one_run(dense, tmp_path: Path, cli) -> None:  # noqa: F811
    pre, post = dense
    out = tmp_path / "sweep.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkrestore", *sweep_args(pre, post), "--json-out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not read_done(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    table, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    partial = json.loads(out.read_text())
    done = [r["name"] for r in partial["candidates"]]
    assert partial["complete"] is False and 1 <= len(done) < 10, done
    assert f"interrupted: {len(done)} measured; kept in {out}" in err
    assert "interrupted: candidates measured so far" in table and done[0] in table

    resumed = cli(*sweep_args(pre, post), "--resume", out, "--json")
    assert resumed.code == 0, resumed.err
    assert sum("from the resume file" in x for x in resumed.err_lines) == len(done)
    whole = cli(*sweep_args(pre, post), "--json", "--quiet")
    assert whole.code == 0, whole.err
    a, b = json.loads(resumed.out), json.loads(whole.out)
    assert untimed(a) == untimed(b)
    assert len(a["candidates"]) == 10 and a["complete"] is True
    assert untimed(json.loads(out.read_text())) == untimed(a)  # the file holds the final document


def test_sigterm_keeps_the_partial_results(dense, tmp_path: Path) -> None:  # noqa: F811
    pre, post = dense
    out = tmp_path / "sweep.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qkrestore", *sweep_args(pre, post), "--json-out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not read_done(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated: " in err and read_done(out)


def test_resume_with_other_settings_is_refused(dense, tmp_path: Path, cli) -> None:  # noqa: F811
    pre, post = dense
    out = tmp_path / "s.json"
    first = cli("sweep", pre, post, "--candidates", "post", *FAST, "--json-out", out, "-q")
    assert first.code == 0, first.err
    before = out.read_text()
    other = [x if x != "128" else "192" for x in FAST]
    res = cli("sweep", pre, post, "--candidates", "post", *other, "--resume", out)
    assert res.code == 2 and len(res.err_lines) == 1
    assert "written with other settings" in res.err and "niah" in res.err
    assert out.read_text() == before  # the file is left as it was
    # the same settings: nothing is measured again, and the document is the same
    again = cli("sweep", pre, post, "--candidates", "post", *FAST, "--resume", out, "--json")
    assert again.code == 0, again.err
    assert "[1/1] post: from the resume file" in again.err
    assert untimed(json.loads(again.out)) == untimed(json.loads(before))


def test_results_file_is_rewritten_after_each_candidate(dense, tmp_path: Path) -> None:  # noqa: F811
    """Through the API: the file holds 1, 2, … candidates as they finish (complete at the end)."""
    import qkrestore
    from qkrestore.evaluate.runlog import Progress

    pre, post = dense
    out = tmp_path / "s.json"
    seen: list[tuple[int, bool]] = []

    class Watch(Progress):
        def finish(self, step: Any) -> None:
            doc = json.loads(out.read_text()) if out.exists() else {"candidates": []}
            seen.append((len(doc["candidates"]), step.resumed))

    qkrestore.sweep(
        pre, post, candidates="post,restore,single", lengths=[128], samples=1, device="cpu",
        json_out=out, progress=Watch(),
    )  # fmt: skip
    # at each finish event the file holds the candidates before it (it is written right after)
    assert seen == [(0, False), (1, False), (2, False), (3, False), (4, False)]
    assert json.loads(out.read_text())["complete"] is True


def test_sweep_and_select_layers_measure_recall_alike(dense, cli) -> None:  # noqa: F811
    """POST measured by ``sweep`` and the unablated model measured by ``select-layers`` are the
    same weights under the same options: the same recall, trials, intervals and settings."""
    _, post = dense
    a = cli("sweep", post, post, "--candidates", "post", *FAST, "--json", "-q")
    b = cli("select-layers", post, *FAST, "--json", "-q")
    assert a.code == 0 and b.code == 0, a.err + b.err
    row, base = json.loads(a.out)["candidates"][0], json.loads(b.out)["unablated"]
    for key in ("recall", "recall_n", "recall_ci", "recall_mean", "recall_mean_ci"):
        assert row[key] == base[key], key
    measuring = ("niah", "recall_items", "lm_eval", "device", "dtype", "autocast", "batch_size")
    sa, sb = json.loads(a.out)["settings"], json.loads(b.out)["settings"]
    assert {k: sa[k] for k in measuring} == {k: sb[k] for k in measuring}


def test_select_layers_stopped_then_resumed_equals_one_run(dense, tmp_path: Path, cli) -> None:  # noqa: F811
    """A library-level stop after two measurements (the caller's progress object raises, as a
    Ctrl-C would), then ``--resume``: the same document as one uninterrupted run."""
    import qkrestore
    from qkrestore.evaluate.runlog import Progress, Step

    _, post = dense
    out = tmp_path / "layers.json"

    class StopAfterTwo(Progress):
        def document(self, doc: dict[str, Any]) -> None:
            measured = len(doc["ranking"]) + (doc["unablated"] is not None)
            if measured == 2:
                raise KeyboardInterrupt

        def finish(self, step: Step) -> None:
            assert not step.resumed

    with pytest.raises(KeyboardInterrupt):
        qkrestore.select_layers(
            post, recall=EXAMPLE, device="cpu", json_out=out, progress=StopAfterTwo()
        )
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [r["layer"] for r in partial["ranking"]] == [0]
    resumed = cli("select-layers", post, "--recall", EXAMPLE, "--device", "cpu", "--resume", out)
    assert resumed.code == 0, resumed.err
    assert sum("from the resume file" in x for x in resumed.err_lines) == 2
    whole = qkrestore.select_layers(post, recall=EXAMPLE, device="cpu")
    assert untimed(json.loads(out.read_text())) == untimed(json.loads(json.dumps(whole.to_json())))
    other = cli("select-layers", post, "--recall", EXAMPLE, "--global-only", "--resume", out)
    assert other.code == 2 and "written with other settings" in other.err
    assert len(other.err_lines) == 1 and "include_sliding" in other.err
