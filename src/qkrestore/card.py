"""The two files qkrestore adds to an output: a Hub model card and the provenance record.

The card tells a human (and the Hub) what was done; ``qkrestore.json`` tells ``verify`` exactly what
to check. POST's own model card is kept, below ours, so nothing POST had is dropped.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ._version import __version__
from .errors import QKRestoreError
from .plan import RestorePlan

if TYPE_CHECKING:
    from .writer import WriteResult

CARD_NAME = "README.md"
PROVENANCE_NAME = "qkrestore.json"
# Where OUT keeps what must not leave this machine (the sources' absolute paths, for ``verify``).
# Under ``.cache/`` like huggingface_hub's own local-folder metadata; ``push`` leaves it out.
LOCAL_RECORD_DIR = ".cache/qkrestore"
LOCAL_RECORD = f"{LOCAL_RECORD_DIR}/sources.json"


@dataclass(frozen=True)
class SourceRecord:
    """How OUT names one of its sources: by Hub id where one is known, else by folder name only.

    ``root`` (the absolute local path) goes only into the local record, never into the card or,
    unless asked, the provenance, so that nothing pushed to the Hub holds the user's paths.
    """

    hub_id: str | None
    root: Path

    @property
    def name(self) -> str:
        return self.hub_id or self.root.name

    @property
    def card_text(self) -> str:
        return f"`{self.hub_id}`" if self.hub_id else f"a local folder (`{self.root.name}`)"


def redact_command(command: str) -> str:
    """The command with every absolute local path shortened to its last component.

    ``qkrestore merge /home/me/base ./sft -o /data/out`` is recorded as
    ``qkrestore merge base ./sft -o out``: what was run, without where on this machine.
    """
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    out = []
    for word in words:
        flag, eq, value = word.partition("=") if word.startswith("--") else ("", "", word)
        if value.startswith(("/", "~")) and len(value) > 1:
            value = Path(value.rstrip("/")).name or value
        out.append(f"{flag}{eq}{value}")
    return shlex.join(out)


PAPER = (
    "Wang & Guo, *Attention Amnesia in Hybrid LLMs: When CoT Fine-Tuning Breaks Long-Range Recall, "
    "and How to Fix It* (https://github.com/LARK-AI-Lab/QK-Restore)"
)
METHOD_TEXT = {
    "qk-restore": (
        "QK-Restore",
        "In the softmax-attention layers listed below, the query/key routing parameters (W_Q, W_K, "
        "their biases and norms) were taken from the pre-SFT checkpoint; every other parameter is the "
        "fine-tuned checkpoint's, byte for byte. This brings back long-range recall that "
        "chain-of-thought fine-tuning erodes, without training.",
    ),
    "qk-pro": (
        "QK-Pro",
        "In the softmax-attention layers listed below, one routing side (W_Q or W_K) was taken from "
        "the pre-SFT checkpoint and the other solved per head in closed form: the matrix closest to "
        "the fine-tuned one whose routing bilinear form matches the pre-SFT one, relaxed by a ridge. "
        "Every other parameter is the fine-tuned checkpoint's, byte for byte.",
    ),
}


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as the user typed it (``argv`` after the program name; default: this process's)."""
    return shlex.join(["qkrestore", *(sys.argv[1:] if argv is None else argv)])


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    m = re.match(r"^---\s*\n(.*?)\n---\s*\n?", text, re.S)
    if not m:
        return {}, text
    try:
        meta = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        meta = {}
    return (meta if isinstance(meta, dict) else {}), text[m.end() :]


def model_card(
    plan: RestorePlan,
    pre: SourceRecord,
    post: SourceRecord,
    command: str,
    post_card: str | None,
    verification: str = "passed (every restored range re-read and hashed before the output was moved into place)",
) -> str:
    """A model card whose metadata the Hub understands, keeping POST's own card below ours."""
    post_meta, post_body = split_front_matter(post_card or "")
    meta: dict[str, Any] = {
        k: v for k, v in post_meta.items() if k not in ("base_model", "base_model_relation", "tags")
    }
    tags = [t for t in post_meta.get("tags", []) or [] if isinstance(t, str)]
    method_tags = [plan.method, "merge"]
    # The Hub's model tree resolves repo ids only: local folders are named in the text instead.
    base = [s.hub_id for s in (pre, post) if s.hub_id]
    meta.update(
        ({"base_model": base, "base_model_relation": "merge"} if base else {})
        | {
            "library_name": "transformers",
            "tags": method_tags + [t for t in tags if t not in method_tags],
        }
    )
    title, explanation = METHOD_TEXT.get(plan.method, (plan.method, ""))
    rows = "\n".join(
        f"| {p.layer} | {plan.layer_kinds[p.layer]} | `{p.name}` | {_rows_text(p.rows, p.shape)} | {p.source} |"
        for p in plan.patches
    )
    params = "".join(f"- {k}: `{v}`\n" for k, v in plan.params.items())
    body = f"""# {title} of `{post.name}`

{explanation}

- **Method:** {title} ({PAPER})
- **Pre-SFT (routing source):** {pre.card_text}
- **Post-SFT (everything else):** {post.card_text}
- **Family adapter:** `{plan.adapter}` (model_type `{plan.model_type}`)
- **Layers:** {", ".join(map(str, plan.layers))} of {plan.num_layers}
- **Targets:** {", ".join(plan.targets)}
- **Verification:** {verification}
{params}
## Command

```bash
{command}
```

## Restored tensors

| layer | kind | tensor | rows | source |
|---|---|---|---|---|
{rows}

Made with qkrestore {__version__}; `qkrestore.json` holds the
full plan and a sha256 of every restored tensor (`qkrestore verify` re-checks it).
"""
    if post_body.strip():
        body += "\n---\n\n## Model card of the post-SFT checkpoint\n\n" + post_body.lstrip()
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n{body}"


def _rows_text(rows: tuple[tuple[int, int], ...], shape: tuple[int, ...]) -> str:
    if len(rows) == 1 and rows[0] == (0, shape[0] if shape else 1):
        return "all"
    if len(rows) > 4:
        return f"{len(rows)} ranges ({rows[0][0]}:{rows[0][1]}, …, {rows[-1][0]}:{rows[-1][1]})"
    return ", ".join(f"{a}:{b}" for a, b in rows)


def provenance(
    plan: RestorePlan,
    pre: SourceRecord,
    post: SourceRecord,
    command: str,
    result: WriteResult,
    record_paths: bool = False,
) -> dict[str, Any]:
    """The record ``verify`` replays: sources by Hub id or name (paths only if asked), the plan,
    and a sha256 of every restored tensor."""

    def source(s: SourceRecord) -> dict[str, Any]:
        return {"source": s.name, "hub_id": s.hub_id} | (
            {"path": str(s.root)} if record_paths else {}
        )

    return {
        "tool": "qkrestore",
        "version": __version__,
        "command": command,
        "sources": {"pre": source(pre), "post": source(post)},
        "plan": plan.to_json(),
        "files": result.files,
        "skipped_files": result.skipped,
        "linked_files": result.linked,
        "tensor_sha256": result.tensor_sha256,
    }


def write_card_and_provenance(
    folder: Path,
    plan: RestorePlan,
    result: WriteResult,
    *,
    pre: SourceRecord,
    post: SourceRecord,
    command: str,
    record_paths: bool = False,
) -> None:
    """README.md, qkrestore.json and the local record of where the sources are, into ``folder``.

    The command is recorded with absolute paths shortened unless ``record_paths`` asks for them.
    """
    if not record_paths:
        command = redact_command(command)
    post_card_path = post.root / CARD_NAME
    post_card = (
        post_card_path.read_text(encoding="utf-8", errors="replace")
        if post_card_path.is_file()
        else None
    )
    (folder / CARD_NAME).write_text(
        model_card(plan, pre, post, command, post_card), encoding="utf-8"
    )
    record = provenance(plan, pre, post, command, result, record_paths)
    (folder / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_local_record(folder, {"pre": str(pre.root), "post": str(post.root)})


def write_local_record(folder: Path, paths: dict[str, str]) -> None:
    """Where the sources are on this machine (for ``verify``), in the folder ``push`` leaves out."""
    local = folder / LOCAL_RECORD
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(json.dumps(paths, indent=2) + "\n", encoding="utf-8")


def source_paths(
    out: Path, record: dict[str, Any], pre: Path | None, post: Path | None
) -> tuple[Path, Path]:
    """PRE's and POST's folders for re-checking OUT: the ones given, else where they were when OUT
    was written; one line saying what to pass when neither is known (a moved or downloaded OUT)."""
    recorded = _recorded_source_paths(out, record)
    pre, post = pre or recorded["pre"], post or recorded["post"]
    if pre is None or post is None:
        missing = " and ".join(s for s, p in (("--pre", pre), ("--post", post)) if p is None)
        raise QKRestoreError(
            f"{out}: OUT does not record where its sources are on this machine",
            hint=f"pass {missing} (the folders it was made from)",
        )
    return Path(pre), Path(post)


def _recorded_source_paths(out: Path, record: dict[str, Any]) -> dict[str, Path | None]:
    """Where OUT's sources were when it was written: the local record, else the provenance's paths
    (outputs made with ``--record-paths`` or by earlier versions)."""
    local = out / LOCAL_RECORD
    found: dict[str, Path | None] = {"pre": None, "post": None}
    if local.is_file():
        try:
            data = json.loads(local.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
        for side in found:
            if isinstance(data.get(side), str):
                found[side] = Path(data[side])
    for side in found:
        path = record.get("sources", {}).get(side, {}).get("path")
        if found[side] is None and isinstance(path, str):
            found[side] = Path(path)
    return found
