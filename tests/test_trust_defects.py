"""Issue 14 point 10: not stricter than the loaders.

An index that lists a tensor its shard does not hold (a known defect of some Qwen3-Next saves,
huggingface_hub#4725) loads in transformers, which reads every tensor of every listed shard; it is a
note here unless the plan restores that tensor's module. Every dtype safetensors 0.8 writes is read,
untouched tensors of any dtype are copied as bytes, and only restored ones need a convertible dtype.
Files are written by hand where torch has no such dtype; sizes here come from the test's own
arithmetic (elements x bits / 8), not from qkrestore's tables.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from conftest import leftovers, load_all, raw, write_checkpoint
from safetensors.torch import save_file
from test_handwritten_families import model_tensors, perturbed

from qkrestore.errors import CheckpointError
from qkrestore.io.checkpoint import Checkpoint

CONFIG = {"model_type": "x", "num_hidden_layers": 2, "layer_types": ["full_attention"] * 2}
INDEX = "model.safetensors.index.json"
BITS = {"F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E8M0": 8, "C64": 64, "F32": 32, "U8": 8}


def pair(tmp_path: Path) -> tuple[Path, Path]:
    t = model_tensors([True, True], False, seed=41)
    pre = write_checkpoint(tmp_path / "pre", CONFIG, t, shards=2)
    post = write_checkpoint(tmp_path / "post", CONFIG, perturbed(t, seed=42), shards=3)
    return pre, post


def edit_index(folder: Path, fn) -> None:
    path = folder / INDEX
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


def first_shard(folder: Path) -> str:
    return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))[0]


# -- index defects -------------------------------------------------------------------------------


def test_listed_tensor_no_shard_holds_is_a_note(tmp_path: Path, cli) -> None:
    pre, post = pair(tmp_path)
    ghost = "mtp.layers.0.mlp.up_proj.weight"
    edit_index(post, lambda wm: wm.__setitem__(ghost, first_shard(post)))
    index_bytes = (post / INDEX).read_bytes()
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--json")
    assert res.code == 0, res.err
    summary = json.loads(res.out)
    assert len(summary["defects"]) == 1 and ghost in summary["defects"][0]
    assert any(ghost in line and line.startswith("note:") for line in res.err_lines), res.err
    assert (out / INDEX).read_bytes() == index_bytes  # POST's files as they are
    # Every tensor but the restored ones is POST's, byte for byte.
    got, _ = load_all(out)
    post_t, _ = load_all(post)
    pre_t, _ = load_all(pre)
    for name, t in got.items():
        routing = ".self_attn.q_" in name or ".self_attn.k_" in name
        assert raw(t) == raw(pre_t[name] if routing else post_t[name]), name
    res = cli("verify", out, "--forward", "never")
    assert res.code == 0, res.err


def test_listed_under_the_wrong_shard_is_a_note(tmp_path: Path, cli) -> None:
    pre, post = pair(tmp_path)
    shards = sorted(set(json.loads((post / INDEX).read_text())["weight_map"].values()))
    name = "model.norm.weight"
    edit_index(post, lambda wm: wm.__setitem__(name, next(s for s in shards if s != wm[name])))
    res = cli("merge", pre, post, "-o", tmp_path / "out", "--json", "--quiet")
    assert res.code == 0, res.err
    assert any(name in d and "lives in" in d for d in json.loads(res.out)["defects"])


def test_listed_tensor_the_plan_needs_is_refused_on_pre_too(tmp_path: Path, cli) -> None:
    pre, post = pair(tmp_path)
    need = "model.layers.1.self_attn.k_proj.bias"
    edit_index(pre, lambda wm: wm.__setitem__(need, first_shard(pre)))
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert res.err_lines[0].startswith("error: ") and need in res.err
    assert "in model.safetensors.index.json but not" in res.err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# -- dtypes ----------------------------------------------------------------------------------------


def write_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file from (dtype, shape, bytes) per tensor, packed in the given order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    data = b""
    for name, (dtype, shape, payload) in entries.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(payload)],
        }
        data += payload
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def nbytes(dtype: str, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    assert n * BITS[dtype] % 8 == 0
    return n * BITS[dtype] // 8


def as_entries(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, list[int], bytes]]:
    return {n: ("F32", list(t.shape), raw(t.float())) for n, t in tensors.items()}


def pattern(seed: int, n: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())


def exotic_extras(seed: int) -> dict[str, tuple[str, list[int], bytes]]:
    shapes = {
        "extra.f4": ("F4", [4, 6]),
        "extra.f6a": ("F6_E2M3", [4, 4]),
        "extra.f6b": ("F6_E3M2", [2, 4]),
        "extra.e8m0": ("F8_E8M0", [3]),
        "extra.c64": ("C64", [3]),
    }
    return {
        n: (dt, shape, pattern(seed + i, nbytes(dt, shape)))
        for i, (n, (dt, shape)) in enumerate(shapes.items())
    }


def test_every_safetensors_dtype_is_read_and_copied_as_bytes(tmp_path: Path, cli) -> None:
    t = model_tensors([True, True], False, seed=43)
    pre = tmp_path / "pre"
    post = tmp_path / "post"
    for root, tensors, seed in ((pre, t, 1), (post, perturbed(t, seed=44), 100)):
        root.mkdir()
        (root / "config.json").write_text(json.dumps(CONFIG))
        write_safetensors(root / "model.safetensors", as_entries(tensors) | exotic_extras(seed))
    # The FNUZ float8 types and C64 as safetensors 0.8 writes them from torch.
    fnuz = {
        "extra.fnuz_e4m3": torch.randn(5).to(torch.float8_e4m3fnuz),
        "extra.fnuz_e5m2": torch.randn(5).to(torch.float8_e5m2fnuz),
        "extra.complex": torch.randn(3, dtype=torch.complex64),
    }
    fdir = tmp_path / "fnuz"
    fdir.mkdir()
    (fdir / "config.json").write_text(json.dumps(CONFIG))
    save_file(fnuz, str(fdir / "model.safetensors"))
    blob = (fdir / "model.safetensors").read_bytes()
    header = json.loads(blob[8 : 8 + struct.unpack("<Q", blob[:8])[0]])
    assert {header[n]["dtype"] for n in fnuz} == {"F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}
    with Checkpoint.open(fdir) as f:
        for name, tensor in fnuz.items():
            assert f.read(name) == raw(tensor), name
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    assert (out / "model.safetensors").stat().st_size == (post / "model.safetensors").stat().st_size
    with Checkpoint.open(out) as got, Checkpoint.open(post) as p, Checkpoint.open(pre) as r:
        for name in exotic_extras(0):
            assert got.read(name) == p.read(name), name
        assert got.read("model.layers.0.self_attn.q_proj.weight") == r.read(
            "model.layers.0.self_attn.q_proj.weight"
        )


def sub_byte_folder(tmp_path: Path, dtype: str, shape: list[int]) -> tuple[Path, bytes]:
    root = tmp_path / f"m-{dtype}-{'x'.join(map(str, shape))}"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    payload = pattern(7, nbytes(dtype, shape))
    lead = pattern(8, 5)  # a 5-byte tensor first, so the sub-byte one starts at an odd offset
    write_safetensors(
        root / "model.safetensors", {"lead": ("U8", [5], lead), "w": (dtype, shape, payload)}
    )
    return root, payload


def test_sub_byte_rows_are_addressed_in_whole_bytes(tmp_path: Path) -> None:
    root, payload = sub_byte_folder(tmp_path, "F4", [8, 6])  # rows of 6 x 4 bits = 3 bytes
    with Checkpoint.open(root) as ck:
        assert ck.tensors["w"].nbytes == 24
        assert ck.read("w") == payload
        assert ck.read("w", (2, 5)) == payload[6:15]
    root, payload = sub_byte_folder(tmp_path, "F6_E2M3", [4, 8])  # rows of 48 bits = 6 bytes
    with Checkpoint.open(root) as ck:
        assert ck.read("w", (1, 3)) == payload[6:18]
    root, payload = sub_byte_folder(tmp_path, "F4", [4, 3])  # rows of 12 bits: not addressable
    with Checkpoint.open(root) as ck:
        assert ck.read("w") == payload
        try:
            ck.read("w", (1, 2))
        except CheckpointError as exc:
            assert "'w'" in str(exc) and "byte boundaries" in str(exc)
        else:
            raise AssertionError("rows of 12 bits were addressed")


def test_elements_that_do_not_fill_whole_bytes_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(CONFIG))
    write_safetensors(root / "model.safetensors", {"w": ("F4", [3], b"\0\0")})
    try:
        Checkpoint.open(root)
    except CheckpointError as exc:
        assert "'w'" in str(exc) and "whole bytes" in str(exc)
    else:
        raise AssertionError("3 elements of 4 bits were accepted")


def restored_f4_pair(tmp_path: Path, post_q_dtype: str) -> tuple[Path, Path]:
    t = model_tensors([True, True], False, seed=45)
    q = "model.layers.0.self_attn.q_proj.weight"
    roots = []
    for side, tensors, seed in (("pre", t, 1), ("post", perturbed(t, seed=46), 2)):
        root = tmp_path / side
        root.mkdir()
        (root / "config.json").write_text(json.dumps(CONFIG))
        entries = as_entries(tensors)
        dtype = "F4" if side == "pre" else post_q_dtype
        shape = list(tensors[q].shape)
        entries[q] = (dtype, shape, pattern(seed, nbytes(dtype, shape)))
        write_safetensors(root / "model.safetensors", entries)
        roots.append(root)
    return roots[0], roots[1]


def test_restored_sub_byte_tensor_is_copied_as_bytes(tmp_path: Path, cli) -> None:
    pre, post = restored_f4_pair(tmp_path, "F4")
    out = tmp_path / "out"
    res = cli("merge", pre, post, "-o", out, "--quiet")
    assert res.code == 0, res.err
    q = "model.layers.0.self_attn.q_proj.weight"
    with Checkpoint.open(out) as got, Checkpoint.open(pre) as r:
        assert got.read(q) == r.read(q)
    assert cli("verify", out, "--forward", "never").code == 0


def test_restored_tensor_needs_a_convertible_dtype(tmp_path: Path, cli) -> None:
    pre, post = restored_f4_pair(tmp_path, "F32")
    res = cli("merge", pre, post, "-o", tmp_path / "out")
    assert res.code == 2 and len(res.err_lines) == 1, res.err
    assert "model.layers.0.self_attn.q_proj.weight" in res.err and "F4" in res.err
    assert "cannot convert" in res.err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
