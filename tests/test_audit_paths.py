"""An audit of every input path as a hostile user would drive it (issue 22's promises).

Each test builds a tiny input, breaks it in one way, and checks the promise: exit 2 with one line
on stderr that names the problem, and nothing left behind (no OUT, no staging folder).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY, leftovers
from lora_fixtures import DENSE, build_adapter

from qkrestore.testing.tiny import build_pair

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """PRE, POST (PRE + noise) and a peft LoRA adapter on PRE: a tiny dense Qwen3."""
    root = tmp_path_factory.mktemp("audit")
    pre, post = build_pair(root, "qwen3", DENSE, shard=None)
    assert TINY["vocab_size"] > 0
    adapter = build_adapter(pre, root / "adapter", r=4, lora_alpha=8, target_modules=QKVO)
    return pre, post, adapter


def edit_header(path: Path, change: Callable[[dict], object]) -> None:
    """Rewrite a safetensors header in place, keeping its length (spaces pad it, as allowed)."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    change(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(blob[:8] + new.ljust(n) + blob[8 + n :])


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def refused(r, out: Path, *words: str) -> None:
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1, r.err
    assert r.err_lines[0].startswith("error: "), r.err
    for w in words:
        assert w in r.err, r.err
    assert not out.exists()
    assert not leftovers(out.parent)


# -- checkpoint files ------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["pre", "post"])
def test_unreferenced_bytes_in_a_shard_refused(dense, tmp_path: Path, cli, side: str) -> None:
    """A header that drops a tensor but keeps its bytes is a file safetensors cannot load: before
    the fix POST's was copied into OUT (which then failed to load) and PRE's read without a word."""
    pre, post, _ = dense
    bad = copy(pre if side == "pre" else post, tmp_path / "bad")
    edit_header(bad / "model.safetensors", lambda h: h.pop("model.embed_tokens.weight"))
    args = (bad, post) if side == "pre" else (pre, bad)
    out = tmp_path / "out"
    refused(cli("merge", *args, "-o", out), out, "belong to no tensor", "model.safetensors")


def test_trailing_bytes_in_a_shard_refused(dense, tmp_path: Path, cli) -> None:
    pre, post, _ = dense
    bad = copy(post, tmp_path / "bad")
    with open(bad / "model.safetensors", "ab") as fh:
        fh.write(b"\0" * 16)
    out = tmp_path / "out"
    refused(cli("merge", pre, bad, "-o", out), out, "last 16 bytes belong to no tensor")


@pytest.mark.parametrize("command", ["merge", "pro"])
@pytest.mark.parametrize("side", ["pre", "post"])
def test_integer_routing_weight_refused(
    dense, tmp_path: Path, cli, command: str, side: str
) -> None:
    """An I32 W_Q on one side: merge used to cast PRE's floats to integers with only a note, and
    pro crashed with an internal error (exit 3)."""
    pre, post, _ = dense
    bad = copy(pre if side == "pre" else post, tmp_path / "bad")
    edit_header(bad / "model.safetensors", lambda h: h[Q0].__setitem__("dtype", "I32"))
    args = (bad, post) if side == "pre" else (pre, bad)
    out = tmp_path / "out"
    refused(cli(command, *args, "-o", out), out, Q0, "I32")


# -- adapter_config.json --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"), [("use_rslora", "no"), ("use_dora", "yes"), ("use_rslora", 1)]
)
def test_adapter_flag_that_is_not_a_boolean_refused(
    dense, tmp_path: Path, cli, key: str, value: object
) -> None:
    """``"use_rslora": "no"`` is truthy: it used to switch rsLoRA's scale on without a word."""
    pre, _, adapter = dense
    bad = copy(adapter, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg[key] = value
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    refused(cli("merge", pre, bad, "-o", out), out, key, "true or false", "adapter_config.json")


# -- non-finite values entering QK-Pro ------------------------------------------------------------


def poison(folder: Path, name: str, file: str = "model.safetensors") -> None:
    """Put one NaN into tensor ``name`` of ``folder/file``."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / file))
    t = tensors[name].clone()
    t.view(-1)[3] = float("nan")
    tensors[name] = t
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("side", "target", "fix"),
    [("pre", "k", "key"), ("pre", "q", "query"), ("pre", "q", "key"), ("post", "k", "query")],
)
def test_pro_refuses_nonfinite_inputs_by_name(
    dense, tmp_path: Path, cli, side: str, target: str, fix: str
) -> None:
    """A NaN in the held side (PRE's W_K under --fix key) used to end in an internal error (exit 3)
    and elsewhere in "QK-Pro's solution is not finite" without saying which input held it."""
    pre, post, _ = dense
    bad = copy(pre if side == "pre" else post, tmp_path / "bad")
    name = f"model.layers.0.self_attn.{target}_proj.weight"
    poison(bad, name)
    args = (bad, post) if side == "pre" else (pre, bad)
    out = tmp_path / "out"
    r = cli("pro", *args, "--fix", fix, "-o", out)
    assert r.code == 2, r.err
    error = [line for line in r.err_lines if not line.startswith("note: ")]
    assert len(error) == 1 and error[0].startswith("error: "), r.err
    assert name in error[0] and f"{side.upper()}'s values are not finite" in error[0], r.err
    assert not out.exists() and not leftovers(tmp_path)


# -- recipes and option values --------------------------------------------------------------------


def test_recipe_key_given_twice_refused(dense, tmp_path: Path, cli) -> None:
    """PyYAML keeps the last of two equal keys: ``layers: [1]`` then ``layers: [0]`` used to
    restore layer 0 only, without a word."""
    pre, post, _ = dense
    recipe = tmp_path / "r.yaml"
    recipe.write_text("layers: [1]\njobs: 1\nlayers: [0]\n")
    out = tmp_path / "out"
    refused(
        cli("merge", pre, post, "-o", out, "--config", recipe), out, "line 3", "'layers'", "twice"
    )


def test_recipe_that_is_a_fifo_refused(dense, tmp_path: Path, cli) -> None:
    """Reading a FIFO blocks until a writer comes: ``--config`` on one used to hang forever."""
    import os

    pre, post, _ = dense
    recipe = tmp_path / "r.yaml"
    os.mkfifo(recipe)
    out = tmp_path / "out"
    refused(cli("merge", pre, post, "-o", out, "--config", recipe), out, "not a regular file")


@pytest.mark.parametrize("where", ["flag", "recipe", "api"])
def test_infinite_ridge_refused(dense, tmp_path: Path, cli, where: str) -> None:
    """``--ridge inf`` used to run and record ``"ridge": Infinity`` in qkrestore.json, which is
    not JSON (and push uploads that file)."""
    import qkrestore
    from qkrestore.errors import QKRestoreError

    pre, post, _ = dense
    out = tmp_path / "out"
    if where == "api":
        with pytest.raises(QKRestoreError, match="ridge: inf: give a finite number"):
            qkrestore.pro(pre, post, out, ridge=float("inf"))
        assert not out.exists() and not leftovers(tmp_path)
        return
    if where == "recipe":
        recipe = tmp_path / "r.yaml"
        recipe.write_text("ridge: .inf\n")
        r = cli("pro", pre, post, "-o", out, "--config", recipe)
    else:
        r = cli("pro", pre, post, "-o", out, "--ridge", "inf")
    refused(r, out, "ridge", "inf: give a finite number")


@pytest.mark.parametrize(
    ("args", "keywords", "name"),
    [
        (("PRE", "POST", "OUT"), {"recipe": 5}, "recipe"),
        ((None, "POST", "OUT"), {}, "pre"),
        (("PRE", "POST", b"out"), {}, "output"),
    ],
)
@pytest.mark.parametrize("command", ["merge", "pro"])
def test_api_path_of_the_wrong_type_is_an_option_error(
    dense, tmp_path: Path, command: str, args: tuple, keywords: dict, name: str
) -> None:
    """``recipe=5`` used to escape as pathlib's bare TypeError, naming no argument."""
    import qkrestore
    from qkrestore.errors import OptionError

    pre, post, _ = dense
    given = {"PRE": pre, "POST": post, "OUT": tmp_path / "out"}
    real = [given.get(a, a) if isinstance(a, str) else a for a in args]
    with pytest.raises(OptionError, match=f"^{name}: .*give a path") as info:
        getattr(qkrestore, command)(*real, **keywords)
    assert info.value.option == name
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


# -- push ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["outside-link", "fifo"])
def test_push_refuses_what_it_must_not_upload(
    dense, tmp_path: Path, cli, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outside link or a FIFO put into OUT after it was written: push used to hand the folder
    to upload_folder as it was (the link's target uploaded, or a FIFO read forever). It is refused
    before any network call (the Hub is unreachable here: a network call would fail otherwise)."""
    import os

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pre, post, _ = dense
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out).code == 0
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the Hub")
    if kind == "fifo":
        os.mkfifo(out / "notes.txt")
    else:
        (out / "notes.txt").symlink_to(secret)
    r = cli("push", out, "someone/model")
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1 and "notes.txt" in r.err, r.err
    assert ("outside the folder" if kind != "fifo" else "FIFO") in r.err


# -- config.json sizes ----------------------------------------------------------------------------


@pytest.mark.parametrize("whole", [True, False])
def test_layer_count_beyond_any_model_refused_before_work(
    dense, tmp_path: Path, cli, whole: bool
) -> None:
    """``num_hidden_layers: 1000000000`` in POST's config.json used to hang merge (transformers
    built that many layers to derive the map); the count is bounded before any work starts."""
    pre, post, _ = dense
    bad = copy(post, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text()) if whole else {"model_type": "qwen3"}
    config["num_hidden_layers"] = 20_000
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    refused(cli("merge", pre, bad, "-o", out), out, "'num_hidden_layers' is 20000", "more than")
    r = cli("inspect-layers", bad)
    assert r.code == 2 and len(r.err_lines) == 1 and "more than" in r.err, r.err


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_adapter_config_that_is_not_a_file_named_as_such(
    dense, tmp_path: Path, cli, kind: str
) -> None:
    """adapter_config.json as a FIFO or a folder: the folder was taken for a checkpoint and the
    message said "config.json: missing", hiding what was wrong."""
    import os

    pre, _, adapter = dense
    bad = copy(adapter, tmp_path / "bad")
    (bad / "adapter_config.json").unlink()
    if kind == "fifo":
        os.mkfifo(bad / "adapter_config.json")
    else:
        (bad / "adapter_config.json").mkdir()
    out = tmp_path / "out"
    what = "a FIFO" if kind == "fifo" else "a folder"
    refused(cli("merge", pre, bad, "-o", out), out, "adapter_config.json", what)
    r = cli("inspect-layers", bad)
    assert r.code == 2 and len(r.err_lines) == 1 and what in r.err, r.err


@pytest.mark.parametrize(
    "args",
    [
        ("select-layers", "ADAPTER"),
        ("drift", "PRE", "ADAPTER"),
        ("inspect-layers", "PRE", "--compare", "ADAPTER"),
        ("merge", "ADAPTER", "POST", "-o", "OUT"),
    ],
)
def test_adapter_where_a_checkpoint_is_needed_named_as_such(
    dense, tmp_path: Path, cli, args: tuple[str, ...]
) -> None:
    """An adapter folder given where a whole model is needed used to get "config.json: missing"."""
    pre, post, adapter = dense
    given = {"PRE": pre, "POST": post, "ADAPTER": adapter, "OUT": tmp_path / "out"}
    r = cli(*[given.get(a, a) for a in args])
    assert r.code == 2, r.err
    assert len(r.err_lines) == 1, r.err
    assert "a PEFT adapter folder" in r.err and "--merge-adapter" in r.err, r.err
    assert not (tmp_path / "out").exists()


# -- ids written into uploaded files ---------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--pre-id", "--post-id", "--push-to-hub"])
@pytest.mark.parametrize("value", ["/home/me/base", "../../etc", "a/b/c"])
def test_hub_id_options_refuse_paths(dense, tmp_path: Path, cli, flag: str, value: str) -> None:
    """``--pre-id /home/me/base`` used to be written into README.md's base_model, qkrestore.json
    and adapter_config.json: the local path that push must never upload."""
    pre, post, _ = dense
    out = tmp_path / "out"
    refused(cli("merge", pre, post, "-o", out, flag, value), out, flag, "Hub repo id", value)


def test_hub_ids_named_in_the_card(dense, tmp_path: Path, cli) -> None:
    pre, post, _ = dense
    out = tmp_path / "out"
    r = cli("merge", pre, post, "-o", out, "--pre-id", "Qwen/Qwen3-0.6B", "--post-id", "gpt2")
    assert r.code == 0, r.err
    card = (out / "README.md").read_text()
    assert "- Qwen/Qwen3-0.6B" in card and "- gpt2" in card


# -- verify on an edited record --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "code", "words"),
    [
        ("dtype", "XX", 2, "expected a safetensors dtype"),
        ("name", "model.layers.9.self_attn.q_proj.weight", 1, "POST does not hold"),
    ],
)
def test_verify_reports_an_edited_plan_entry(
    dense, tmp_path: Path, cli, field: str, value: str, code: int, words: str
) -> None:
    """A provenance record naming an unknown dtype or a tensor POST lacks used to end verify in an
    internal error (KeyError, exit 3)."""
    pre, post, _ = dense
    out = tmp_path / "out"
    assert cli("merge", pre, post, "-o", out).code == 0
    record = json.loads((out / "qkrestore.json").read_text())
    record["plan"]["tensors"][0][field] = value
    (out / "qkrestore.json").write_text(json.dumps(record))
    r = cli("verify", out)
    assert r.code == code, r.err
    assert words in r.err and "internal error" not in r.err, r.err
