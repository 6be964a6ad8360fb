"""What OUT says about its sources: Hub ids in the card, no local paths in anything pushed.

A local folder is named by its Hub id when one can be found (the HF cache entry it lies in, or an
option), else by its folder name; absolute paths stay in a local record under ``.cache/qkrestore``
that ``push`` leaves out and ``verify`` reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import QWEN3_NEXT, build_hf_pair

from qkrestore.surgery.card import LOCAL_RECORD, redact_command


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_hf_pair(tmp_path_factory.mktemp("prov"), "qwen3_next", QWEN3_NEXT)


def front_matter(out: Path) -> dict:
    return yaml.safe_load((out / "README.md").read_text().split("---")[1])


def pushed_files(out: Path) -> list[Path]:
    """The files huggingface_hub's upload_folder would send, with push's own ignore patterns."""
    from huggingface_hub.utils import filter_repo_objects

    from qkrestore.surgery.card import LOCAL_RECORD_DIR

    rel = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    kept = filter_repo_objects(rel, ignore_patterns=[f"{LOCAL_RECORD_DIR}/*"])
    return [out / r for r in kept]


def test_local_sources_leave_no_path_in_what_is_pushed(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    res = cli("merge", str(pre.absolute()), str(post.absolute()), "-o", str(out.absolute()))
    assert res.code == 0, res.err
    assert "no Hub id is known for PRE" in res.err and "--pre-id" in res.err
    front = front_matter(out)
    assert "base_model" not in front and front["library_name"] == "transformers"
    files = pushed_files(out)
    assert out / "README.md" in files and out / "qkrestore.json" in files
    assert out / LOCAL_RECORD not in files
    root = str(pre.parent.absolute())
    for f in files:
        assert root not in f.read_bytes().decode("utf-8", "replace"), f.name
    record = json.loads((out / "qkrestore.json").read_text())
    assert record["sources"]["post"] == {"source": "post", "hub_id": None}
    assert record["command"].startswith("qkrestore merge pre post -o out")
    # ... but this machine still knows where the sources are, for verify.
    local = json.loads((out / LOCAL_RECORD).read_text())
    assert local == {"pre": str(pre.absolute()), "post": str(post.absolute())}
    assert cli("verify", out, "--forward", "never").code == 0


def test_ids_from_options_and_paths_on_request(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    res = cli(
        "merge", pre, post, "-o", out, "--pre-id", "org/base", "--post-id", "org/sft",
        "--record-paths", "-q",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert front_matter(out)["base_model"] == ["org/base", "org/sft"]
    record = json.loads((out / "qkrestore.json").read_text())
    assert record["sources"]["pre"] == {
        "source": "org/base",
        "hub_id": "org/base",
        "path": str(pre.absolute()),
    }


def test_a_folder_in_the_hf_cache_is_named_by_its_repo(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    snaps = {}
    for name, src in (("pre", pre), ("post", post)):
        snap = tmp_path / "hub" / f"models--acme--{name}-model" / "snapshots" / "abc123"
        shutil.copytree(src, snap)
        snaps[name] = snap
    out = tmp_path / "out"
    res = cli("merge", snaps["pre"], snaps["post"], "-o", out, "--json")
    assert res.code == 0, res.err
    assert front_matter(out)["base_model"] == ["acme/pre-model", "acme/post-model"]
    assert "no Hub id" not in res.err


def test_verify_a_moved_output(pair, tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out, "-q").code == 0
    moved = tmp_path / "elsewhere"
    shutil.move(out, moved)
    shutil.rmtree(moved / ".cache")  # as downloaded from the Hub: no local record
    res = cli("verify", moved, "--forward", "never")
    assert res.code == 2 and "--pre and --post" in res.err and len(res.err.splitlines()) == 1
    res = cli("verify", moved, "--pre", pre, "--post", post, "--forward", "never")
    assert res.code == 0, res.err


def test_redact_command() -> None:
    cmd = "qkrestore merge /home/me/base ./sft -o /data/out --config=/etc/r.yaml --layers 3"
    assert redact_command(cmd) == "qkrestore merge base ./sft -o out --config=r.yaml --layers 3"
