"""The tool on a real pretrained model: SmolLM2-135M-Instruct (30 llama layers, bf16), on the CPU.

Every other test runs on random tiny models. Here ``merge``, ``pro``, ``verify`` (with its forward
pass), ``inspect-layers``, ``niah`` and the LoRA paths run on real weights, with the same byte-exact
checks. The fixture comes from ``scripts/smollm2_fixture.py`` (see ``tests/real_model.py``: skipped
when absent, failed when ``QKRESTORE_REQUIRE_REAL=1`` as in CI).

POST is PRE plus seeded Gaussian noise of 2 % of each tensor's standard deviation, in every tensor
(not a fine-tune: the checks are about bytes, and noise moves every tensor, so a byte taken from the
wrong side shows). The LoRA adapter is trained by peft for a few AdamW steps on one short chat
exchange. Each model is built once per session.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_merged, load_all, raw, routing_rows
from lora_fixtures import assert_state, base_state, merged_state, missing_key_warnings
from real_model import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    header_bytes,
    locate,
    noisy,
    read_tensors,
    source,
    write_variant,
    zero_queries,
)
from test_pro_cli import reference_solve

from qkrestore.cli import main

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[1]
ALL = list(range(LAYERS))


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return locate()


@pytest.fixture(scope="session")
def pair(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("smollm2")
    return smollm2, write_variant(smollm2, root / "post", lambda t: noisy(t, seed=24))


@pytest.fixture(scope="session")
def merged(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    pre, post = pair
    out = tmp_path_factory.mktemp("merge") / "out"
    assert main(["merge", str(pre), str(post), "-o", str(out), "-q"]) == 0
    return out


def fixture_script():
    spec = importlib.util.spec_from_file_location("fixture", REPO / "scripts/smollm2_fixture.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_fixture_script_refuses_a_wrong_wheel_and_an_incomplete_folder(tmp_path: Path) -> None:
    """Runs without the fixture: the checks that guard it."""
    script = fixture_script()
    fake = tmp_path / script.WHEEL_NAME
    fake.write_bytes(b"not the wheel")
    with pytest.raises(script.FixtureError, match=r"sha256 .* is not the expected"):
        script.check_wheel(fake)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert script.main(["--wheel", str(fake), "--out", str(out)]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]  # left alone
    assert script.main(["--wheel", str(fake), "--out", str(out), "--force"]) == 1  # still refused
    assert (out / "config.json").is_file()


def test_fixture_is_the_pinned_smollm2(smollm2: Path) -> None:
    """The folder was built from the pinned wheel and is the model the figures were measured on."""
    script = fixture_script()
    assert script.is_complete(smollm2)
    src = source(smollm2)
    assert src["wheel_sha256"] == script.WHEEL_SHA256
    assert "Paris" in src["sanity_answer"]
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"]) == ("llama", 30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (HEADS, KV_HEADS)
    assert cfg["max_position_embeddings"] == 8192 and cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg
    tensors = read_tensors(smollm2)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "lm_head.weight" not in tensors  # tied, as save_pretrained writes llama
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (KV_HEADS * HEAD_DIM, HIDDEN)


def test_inspect_layers_reads_thirty_global_layers(smollm2: Path, cli) -> None:
    res = cli("inspect-layers", smollm2, "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["adapter"] == "llama" and doc["num_layers"] == LAYERS
    assert doc["global_layers"] == ALL and doc["local_layers"] == []
    rows = {t["name"]: t["rows"] for layer in doc["layers"] for t in layer["tensors"] if t["rows"]}
    for i in (0, 29):
        p = f"model.layers.{i}.self_attn."
        assert rows[p + "q_proj.weight"] == [[0, HEADS * HEAD_DIM]]
        assert rows[p + "k_proj.weight"] == [[0, KV_HEADS * HEAD_DIM]]


def test_merge_is_byte_exact(pair: tuple[Path, Path], merged: Path) -> None:
    pre, post = pair
    pre_t, post_t = read_tensors(pre), read_tensors(post)
    expected = routing_rows(post_t, ALL)
    assert len(expected) == 2 * LAYERS
    # The test can fail: PRE and POST differ in every restored tensor.
    assert all(raw(pre_t[n]) != raw(post_t[n]) for n in expected)
    assert_merged(merged, pre, post, expected)
    # Same header as POST: names, dtypes, shapes and offsets, so the bytes sit where POST's do.
    assert header_bytes(merged / "model.safetensors") == header_bytes(post / "model.safetensors")
    plan = json.loads((merged / "qkrestore.json").read_text())
    assert sorted({t["layer"] for t in plan["plan"]["tensors"]}) == ALL


def test_verify_runs_the_forward_pass_and_catches_a_flipped_byte(
    merged: Path, tmp_path: Path, cli
) -> None:
    res = cli("verify", merged, "--forward", "always", "--json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert doc["forward"]["ran"] is True
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    header = header_bytes(broken / "model.safetensors")
    name = "model.layers.7.self_attn.k_proj.weight"  # a restored tensor: PRE's bytes expected
    start = len(header) + json.loads(header[8:])[name]["data_offsets"][0]
    with (broken / "model.safetensors").open("r+b") as fh:
        fh.seek(start + 100)
        b = fh.read(1)
        fh.seek(start + 100)
        fh.write(bytes([b[0] ^ 1]))
    res = cli("verify", broken, "--forward", "never", "--json")
    assert res.code == 1, res.err
    assert name in res.out or "model.safetensors" in res.out, res.out


def test_pro_fix_key(pair: tuple[Path, Path], tmp_path: Path, cli) -> None:
    pre, post = pair
    out = tmp_path / "pro"
    res = cli("pro", pre, post, "-o", out, "--fix", "key", "--device", "cpu", "--json")
    assert res.code == 0, res.err
    ridge = json.loads(res.out)["plan"]["params"]["ridge"]
    got, pre_t, post_t = read_tensors(out), read_tensors(pre), read_tensors(post)
    assert header_bytes(out / "model.safetensors") == header_bytes(post / "model.safetensors")
    for name, t in got.items():
        if name.endswith("k_proj.weight"):
            assert raw(t) == raw(pre_t[name]), f"{name} should be PRE's"
        elif not name.endswith("q_proj.weight"):
            assert raw(t) == raw(post_t[name]), f"{name} should be POST's"
    for i in (0, 14, 29):
        p = f"model.layers.{i}.self_attn."
        q_got = got[p + "q_proj.weight"]
        want = reference_solve(
            pre_t[p + "q_proj.weight"].float(),
            post_t[p + "q_proj.weight"].float(),
            pre_t[p + "k_proj.weight"].float(),
            HEADS,
            KV_HEADS,
            float(ridge),
            "key",
        )
        # The solve is exact up to the one rounding to bf16 (relative half-step 2^-8).
        np.testing.assert_allclose(q_got.double().numpy(), want, rtol=2**-7, atol=1e-6)
        assert not torch.equal(q_got, pre_t[p + "q_proj.weight"])
        assert not torch.equal(q_got, post_t[p + "q_proj.weight"])
    res = cli("verify", out, "--forward", "always", "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["forward"]["ran"] is True


# -- niah ----------------------------------------------------------------------------------------

NIAH = ("--lengths", "256,512", "--task", "single-1", "--samples", "3", "--chat-template")
NIAH_RUN = ("--device", "cpu", "--max-new-tokens", "12", "--json")


def niah_correct(cli, model: Path) -> int:
    res = cli("niah", model, *NIAH, *NIAH_RUN)
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    assert [r["length"] for r in doc["results"]] == [256, 512]
    assert all(s["prompt_tokens"] <= s["length"] for s in doc["samples"])
    return sum(r["correct"] for r in doc["results"])


@pytest.fixture(scope="session")
def blind(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PRE with every layer's W_Q zeroed: every head attends uniformly."""
    return write_variant(smollm2, tmp_path_factory.mktemp("blind") / "no-query", zero_queries)


def test_niah_recall_of_the_real_model(smollm2: Path, blind: Path, cli) -> None:
    """PRE finds the needle (measured: 16 of 16 at 256 and 512 tokens, 8 samples each); with every
    layer's W_Q zeroed (uniform attention) it cannot, so the probe measures recall, not luck."""
    assert niah_correct(cli, smollm2) >= 5  # of 6
    assert niah_correct(cli, blind) <= 1


def test_attn_locality_sees_the_real_heads(smollm2: Path, blind: Path, cli) -> None:
    """On a NIAH prompt PRE's heads are far from uniform (some local, some on the needle); the
    zeroed-W_Q model reads exactly the uniform values, so the numbers measure the heads."""
    res = cli(
        "attn-locality", smollm2, blind, "--length", "384", "--samples", "1", "--last-k", "32",
        "--chat-template", "--device", "cpu", "--json",
    )  # fmt: skip
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    uni = doc["uniform"]
    pre, flat = ([x for x in m["layers"]] for m in doc["models"])
    assert len(pre) == LAYERS
    for x in flat:
        for h in x["local_mass"]["heads"]:
            assert h == pytest.approx(uni["local_mass"], abs=1e-4)
        for h in x["needle_weight"]["heads"]:
            assert h == pytest.approx(uni["needle_weight"], abs=1e-4)
    local = [h for x in pre for h in x["local_mass"]["heads"]]
    needle = [h for x in pre for h in x["needle_weight"]["heads"]]
    assert max(local) > 0.9 and max(local) > 3 * uni["local_mass"]
    assert max(needle) > 5 * uni["needle_weight"]


# -- LoRA ----------------------------------------------------------------------------------------

CHAT = (
    "<|im_start|>user\nWhat is 17 plus 25?<|im_end|>\n"
    "<|im_start|>assistant\n17 plus 25 is 42. First 17 + 20 = 37, then 37 + 5 = 42.<|im_end|>\n"
)


@pytest.fixture(scope="session")
def adapter(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter (q, k, v, o; r 8) trained by peft for 4 AdamW steps on one exchange."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    peft_model = get_peft_model(model, lora)
    ids = tok(CHAT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    for _ in range(4):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        losses.append(float(peft_model(input_ids=ids, labels=ids).loss))
    assert losses[-1] < losses[0], losses  # it trained
    out = tmp_path_factory.mktemp("lora") / "adapter"
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_reference(smollm2: Path, adapter: Path) -> tuple[dict, dict, dict]:
    """PRE's state (float32), peft's merge of the adapter, and the routing rows: the reference."""
    pre_state = base_state(smollm2)
    ref, _ = merged_state(smollm2, adapter)
    return pre_state, ref, routing_rows(pre_state, ALL)


def test_lora_adapter_out_matches_peft(
    smollm2: Path, adapter: Path, lora_reference, tmp_path: Path, cli
) -> None:
    pre_state, ref, rows = lora_reference
    out = tmp_path / "adapter-out"
    res = cli("merge", smollm2, adapter, "-o", out, "--json")
    assert res.code == 0, res.err
    assert json.loads(res.out)["output_kind"] == "adapter"
    got, warns = merged_state(smollm2, out)
    assert not missing_key_warnings(warns), warns
    # The adapter moved the routing weights, so keeping them would fail.
    assert any(not torch.equal(ref[n], pre_state[n]) for n in rows)
    assert_state(got, ref, pre_state, rows)


def test_lora_merge_adapter_matches_peft(
    smollm2: Path, adapter: Path, lora_reference, tmp_path: Path, cli
) -> None:
    _, ref, rows = lora_reference
    out = tmp_path / "model"
    res = cli("merge", smollm2, adapter, "-o", out, "--merge-adapter")
    assert res.code == 0, res.err
    got, metas = load_all(out)
    pre_files, pre_metas = load_all(smollm2)
    assert metas == pre_metas and set(got) == set(pre_files)
    assert header_bytes(out / "model.safetensors") == header_bytes(smollm2 / "model.safetensors")
    moved = 0
    for name, t in got.items():
        if name in rows or not any(f"{m}.weight" in name for m in ("v_proj", "o_proj")):
            # Routing rows and tensors the adapter does not touch: PRE's bytes.
            assert raw(t) == raw(pre_files[name]), name
            continue
        # v/o: peft's float32 merge, rounded once to bf16 (relative half-step 2^-8).
        torch.testing.assert_close(t.float(), ref[name], rtol=2**-8, atol=1e-7, msg=name)
        moved += int((t != pre_files[name]).sum())
    assert moved > 0  # the adapter's change is visible in bf16
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == json.loads((smollm2 / "config.json").read_text())
