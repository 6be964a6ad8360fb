"""``qkrestore demo``: the whole job on a tiny random hybrid, offline, in seconds.

PRE is a freshly initialised Qwen3-Next-style model (linear-attention layers with two gated
full-attention layers); POST is PRE with every weight nudged, as fine-tuning would, saved in several
shards next to a chat template. The demo then runs the real commands on them, printing each one.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path

from rich.console import Console

from .errors import QKRestoreError
from .hf_logging import quiet_transformers

TINY_QWEN3_NEXT = {
    "vocab_size": 99,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "num_hidden_layers": 4,
    "hidden_act": "silu",
    "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    "linear_conv_kernel_dim": 2,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 12,
    "shared_expert_intermediate_size": 12,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_pair(root: Path, seed: int = 0, noise: float = 0.005) -> tuple[Path, Path]:
    """Write a tiny PRE (one shard) and a drifted POST (three shards plus a chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    quiet_transformers()
    torch.manual_seed(seed)
    config = AutoConfig.for_model("qwen3_next", **TINY_QWEN3_NEXT)
    model = AutoModelForCausalLM.from_config(config)
    pre, post = root / "pre", root / "post"
    model.save_pretrained(pre)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.save_pretrained(post, max_shard_size="60KB")
    (post / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return pre, post


def run_demo(workdir: Path | None, console: Console) -> Path:
    from .cli import main

    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="qkrestore-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    out = root / "post-qkrestore"
    console.rule("[bold]qkrestore demo")
    console.print("Building a tiny Qwen3-Next-style hybrid (PRE) and a drifted copy (POST) …")
    pre, post = build_pair(root)
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
        f"                    its README.md is the model card, qkrestore.json the provenance.\n"
        f"The last table shows OUT's Q/K drift from PRE is 0 in the restored layers.",
        highlight=False,
    )
    return root
