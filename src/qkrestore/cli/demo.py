"""``qkrestore demo``: the whole job on a tiny random hybrid, offline, in seconds.

PRE is a freshly initialised Qwen3-Next-style model (linear-attention layers with two gated
full-attention layers); POST is PRE with every weight nudged, as fine-tuning would, saved in several
shards next to a chat template. The demo then runs the real commands on them, printing each one.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..errors import QKRestoreError
from ..testing.tiny import (
    QWEN3_NEXT,
    build_pair,
    example_texts,
    tokenizer_sized,
    word_tokenizer,
)
from .app import main
from .options import JsonOpt
from .output import emit_json, err_console, out_console

DEMO_CONTEXT = 8192  # long enough for README's sweep and select-layers examples (4096,8192)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEMO_EPILOG = """[bold]Examples[/bold]

  qkrestore demo
  qkrestore demo --workdir ./qkrestore-demo
"""


def build_demo_pair(root: Path) -> tuple[Path, Path]:
    """A tiny PRE (one file) and a drifted POST (several shards plus a chat template), both with a
    word-level tokenizer and an 8K context, so that README's ``sweep``, ``select-layers`` and
    ``niah`` examples run on them as they are."""
    tok = word_tokenizer(example_texts())
    kwargs = QWEN3_NEXT | tokenizer_sized(tok, DEMO_CONTEXT)
    pre, post = build_pair(root, "qwen3_next", kwargs, noise=0.005, shard="60KB")
    for folder in (pre, post):
        tok.save_pretrained(folder)
    (post / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return pre, post


def run_demo(workdir: Path | None, console: Console) -> Path:
    """Build the pair, run inspect-layers, merge and verify through the real CLI, and say where."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qkrestore-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    out = root / "post-qkrestore"
    console.rule("[bold]qkrestore demo")
    console.print("Building a tiny Qwen3-Next-style hybrid (PRE) and a drifted copy (POST) …")
    pre, post = build_demo_pair(root)
    console.print(f"PRE:  {pre}\nPOST: {post}\n", highlight=False)

    steps = [
        ["inspect-layers", str(post), "--compare", str(pre)],
        ["merge", str(pre), str(post), "-o", str(out), "--overwrite"],
        ["verify", str(out)],
        ["inspect-layers", str(out), "--compare", str(pre)],
    ]
    for argv in steps:
        console.rule(f"$ qkrestore {shlex.join(argv)}", style="dim", align="left")
        rc = main(argv)
        if rc != 0:
            raise QKRestoreError(f"demo step 'qkrestore {argv[0]}' failed with exit code {rc}")
    console.rule("[bold green]done")
    console.print(
        f"Files are in {root}:\n"
        f"  pre/              the pre-SFT model\n"
        f"  post/             the fine-tuned model, in several shards\n"
        f"  post-qkrestore/   POST with layers 1 and 3's Q/K routing restored from PRE;\n"
        f"                    README.md is its model card, qkrestore.json its provenance.\n"
        f"The last table shows OUT's Q/K drift from PRE is 0 in the restored layers.",
        highlight=False,
    )
    return root


def demo(
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Where to write the demo models (default: a new temp folder).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build a tiny Qwen3-Next-style hybrid pair offline, then inspect, merge and verify it."""
    if not json_out:
        run_demo(workdir, out_console)
        return
    with contextlib.redirect_stdout(sys.stderr):  # the steps' own output is for humans
        root = run_demo(workdir, err_console)
    emit_json(
        {
            "ok": True,
            "workdir": str(root),
            "pre": str(root / "pre"),
            "post": str(root / "post"),
            "output": str(root / "post-qkrestore"),
        }
    )
