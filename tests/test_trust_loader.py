"""Issue 14 point 1: the tool acts on the weight files transformers loads, and OUT holds no others.

Each case builds a tiny Llama pair with transformers, adds what real folders carry beside the
weights (a stale single file from an older save, a variant, Mistral-format files, stray shards),
merges, and then loads OUT with transformers itself: the routing parameters the loaded model holds
must be PRE's, the others POST's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_hf_pair, leftovers, load_all, perturbed, raw, write_checkpoint
from safetensors.torch import save_file
from test_handwritten_families import model_tensors

from qkrestore.errors import CheckpointError
from qkrestore.io.checkpoint import Checkpoint
from qkrestore.io.runtime import quiet_transformers

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
ROUTING = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")


@pytest.fixture
def llama(tmp_path: Path) -> tuple[Path, Path]:
    """PRE as one file, POST sharded (index + shards), as build_hf_pair writes them."""
    pre, post = build_hf_pair(tmp_path, "llama", {"num_hidden_layers": 2}, seed=5)
    assert (post / INDEX).is_file() and not (post / SINGLE).exists()
    return pre, post


def add_stale_single(folder: Path, seed: int = 9) -> dict[str, torch.Tensor]:
    """An older save beside the shards: same names and shapes, other values."""
    tensors, _ = load_all(folder)
    stale = perturbed(tensors, seed=seed, scale=0.5)
    save_file(stale, str(folder / SINGLE), metadata={"format": "pt"})
    return stale


def loaded_state(folder: Path) -> dict[str, torch.Tensor]:
    """The parameters as transformers' from_pretrained holds them after loading ``folder``."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_loaded_routing(out: Path, pre: dict, rest: dict) -> None:
    """Loaded OUT: every routing parameter equals PRE's, every other checkpoint tensor ``rest``'s."""
    state = loaded_state(out)
    checked = 0
    for name in rest:
        if name not in state:  # tied lm_head and the like
            continue
        source = pre if name.endswith(ROUTING) else rest
        assert raw(state[name].to(source[name].dtype)) == raw(source[name]), name
        checked += name.endswith(ROUTING)
    assert checked == 4  # q and k of both layers


def test_stale_single_file_beside_shards_is_refused(llama, tmp_path: Path, cli) -> None:
    pre, post = llama
    add_stale_single(post)
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2, res.err
    assert len(res.err_lines) == 1, res.err
    line = res.err_lines[0]
    assert "POST" in line and SINGLE in line and INDEX in line and "--post-weights" in line
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("chosen", [INDEX, SINGLE])
def test_chosen_set_is_the_only_one_in_out_and_loads_pre_routing(
    llama, tmp_path: Path, cli, chosen: str
) -> None:
    pre, post = llama
    shards_before, _ = load_all(post)
    stale = add_stale_single(post)
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--post-weights", chosen, "--json", "--quiet")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    other = SINGLE if chosen == INDEX else INDEX
    assert not (out / other).exists()
    assert other in summary["skipped_files"]
    assert summary["weight_files"]["post"]["entry"] == chosen
    pre_t, _ = load_all(pre)
    assert_loaded_routing(out, pre_t, shards_before if chosen == INDEX else stale)


def test_identical_second_set_is_not_refused_and_not_copied(llama, tmp_path: Path, cli) -> None:
    pre, post = llama
    tensors, _ = load_all(post)
    save_file(tensors, str(post / SINGLE), metadata={"format": "pt"})
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--json", "--quiet")
    assert res.code == 0, res.err
    files = sorted(p.name for p in out.iterdir() if "safetensors" in p.name)
    assert files == [SINGLE]  # the set transformers loads, restored; no shards, no index
    summary = json.loads(res.out)
    assert summary["weight_files"]["post"]["identical_sets_not_read"] == [INDEX]
    pre_t, _ = load_all(pre)
    assert_loaded_routing(out, pre_t, tensors)


def test_pre_with_two_different_sets_is_refused_then_chosen(llama, tmp_path: Path, cli) -> None:
    pre, post = llama
    # PRE: its single file is the model; a stale sharded save lies beside it.
    pre_t, _ = load_all(pre)
    shard_dir = tmp_path / "stale"
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pre))
    model.save_pretrained(shard_dir, max_shard_size="40KB")
    for f in shard_dir.iterdir():
        if f.name != "config.json" and f.name != "generation_config.json":
            shutil.copy(f, pre / f.name)
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith("error: PRE") and "--pre-weights" in res.err_lines[0]
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--pre-weights", SINGLE, "--quiet")
    assert res.code == 0, res.err
    post_t, _ = load_all(post)
    assert_loaded_routing(tmp_path / "out", pre_t, post_t)


def test_naming_a_set_that_is_not_there(llama, tmp_path: Path, cli) -> None:
    pre, post = llama
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--post-weights", "../pre/x")
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert "no weight set named '../pre/x'" in res.err and INDEX in res.err


def test_other_weight_files_never_reach_out(llama, tmp_path: Path, cli) -> None:
    """Variants, Mistral-format files, stray shards and sub-folder weights hold POST's routing."""
    pre, post = llama
    tensors, _ = load_all(post)
    extra = [
        "model.fp16.safetensors",
        "consolidated.safetensors",
        "model-00001-of-00009.safetensors",  # a shard of an older save, not in the index
        "original/model.safetensors",
        "pytorch_model.bin.index.json",
    ]
    for rel in extra:
        (post / rel).parent.mkdir(exist_ok=True)
        if rel.endswith(".safetensors"):
            save_file(tensors, str(post / rel), metadata={"format": "pt"})
        else:
            (post / rel).write_text("{}")
    (post / "params.json").write_text("{}")  # not weights: carried over as POST's
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--json", "--quiet")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    for rel in extra:
        assert not (out / rel).exists(), rel
        assert rel in summary["skipped_files"], rel
    assert (out / "params.json").is_file()
    listed = set(json.loads((post / INDEX).read_text())["weight_map"].values())
    assert {p.name for p in out.glob("*.safetensors")} == listed


def test_inspect_layers_names_the_weight_files_in_use(llama, tmp_path: Path, cli) -> None:
    _, post = llama
    tensors, _ = load_all(post)
    save_file(tensors, str(post / "model.fp16.safetensors"), metadata={"format": "pt"})
    res = cli("inspect-layers", post, "--json")
    assert res.code == 0, res.err
    wf = json.loads(res.out)["weight_files"]
    listed = sorted(set(json.loads((post / INDEX).read_text())["weight_map"].values()))
    assert wf["entry"] == INDEX and wf["files"] == listed
    assert wf["not_read"] == ["model.fp16.safetensors"]


def test_config_transformers_weights_comes_first(tmp_path: Path) -> None:
    """transformers opens the file config.json's ``transformers_weights`` names before any other
    (``_get_resolved_checkpoint_files``); a different set beside it is refused, naming it first."""
    config = {"model_type": "x", "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}
    config["transformers_weights"] = INDEX
    t = model_tensors([True, True], False, seed=71)
    root = write_checkpoint(tmp_path / "m", config, t, shards=2)
    save_file(perturbed(t, seed=72), str(root / SINGLE), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        Checkpoint.open(root)
    assert f"{INDEX} (the one transformers loads: named by config.json's" in str(err.value)
    with Checkpoint.open(root, weights=SINGLE) as ck:
        assert ck.view is not None and ck.view.entry == SINGLE and ck.shards.keys() == {SINGLE}
