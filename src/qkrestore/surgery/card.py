"""The two files qkrestore adds to an output: a Hub model card and the provenance record.

The card tells a human (and the Hub) what was done; ``qkrestore.json`` tells ``verify`` exactly what
to check. POST's own model card is kept, below ours, so nothing POST had is dropped.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from .._version import __version__
from ..errors import QKRestoreError
from ..io.hub import LOCAL_RECORD_DIR
from .plan import RestorePlan
from .writer import PROVENANCE_NAME, WriteResult

CARD_NAME = "README.md"
# Output kinds, each with its own card template: POST's layout (a checkpoint), a PEFT adapter, or
# PRE + a PEFT adapter merged into a full checkpoint.
CHECKPOINT, ADAPTER, MERGED_ADAPTER = "checkpoint", "adapter", "model"
# The provenance key that marks an output made from a PEFT adapter (verify re-merges it with PRE).
ADAPTER_JOB_KEY = "adapter_job"
# Where OUT keeps what must not leave this machine (the sources' absolute paths, for ``verify``).
# Under ``.cache/`` like huggingface_hub's own local-folder metadata; ``push`` leaves it out.
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


@dataclass(frozen=True)
class CardInput:
    """What a card and provenance record describe, whatever the output kind.

    ``title``/``explanation`` come from the method object (:class:`qkrestore.surgery.methods.Method`), so
    no card text is looked up by method name; ``adapter`` holds an adapter job's own record
    (its per-module plan and what was written), ``None`` for a checkpoint POST.
    """

    kind: str  # CHECKPOINT | ADAPTER | MERGED_ADAPTER
    plan: RestorePlan
    pre: SourceRecord
    post: SourceRecord
    command: str
    title: str
    explanation: str
    record_paths: bool = False
    adapter: dict[str, Any] | None = None


def model_card(
    plan: RestorePlan,
    pre: SourceRecord,
    post: SourceRecord,
    command: str,
    post_card: str | None,
    verification: str = "passed (every restored range re-read and hashed before the output was moved into place)",
    *,
    title: str = "",
    explanation: str = "",
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
    title = title or plan.method
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

    return {
        "tool": "qkrestore",
        "version": __version__,
        "command": command,
        "sources": {"pre": _source(pre, record_paths), "post": _source(post, record_paths)},
        "plan": plan.to_json(),
        "files": result.files,
        "skipped_files": result.skipped,
        "linked_files": result.linked,
        "tensor_sha256": result.tensor_sha256,
    }


def adapter_card(card: CardInput, post_card: str | None) -> str:
    """The card of an adapter job's output: a PEFT adapter (``library_name: peft``, its base the
    PRE Hub id) or the merged checkpoint; the input adapter's own card is kept below ours."""
    assert card.adapter is not None
    plan, merged = card.plan, card.kind == MERGED_ADAPTER
    old_meta, old_body = split_front_matter(post_card or "")
    meta = {
        k: v
        for k, v in old_meta.items()
        if k not in ("base_model", "base_model_relation", "library_name", "tags")
    }
    # peft tags its cards ``base_model:adapter:<base>``, a local path for a local base: drop them
    tags = [
        t
        for t in old_meta.get("tags", []) or []
        if isinstance(t, str) and not t.startswith("base_model:")
    ]
    # The Hub's model tree resolves repo ids only: local folders are named in the text instead.
    ids = [s.hub_id for s in (card.pre, card.post) if s.hub_id]
    if merged:
        meta |= ({"base_model": ids, "base_model_relation": "merge"} if ids else {}) | {
            "library_name": "transformers"
        }
        own = [plan.method, "merge", "lora"]
    else:
        meta |= ({"base_model": card.pre.hub_id} if card.pre.hub_id else {}) | {
            "library_name": "peft"
        }
        own = [plan.method, "lora", "peft"]
    meta["tags"] = own + [t for t in tags if t not in own]
    rows = "\n".join(
        f"| {a['layer']} | `{a['module']}` | {a['action']} | {a['target']} |"
        for a in card.adapter["adapter_plan"]["modules"]
        if a["action"] != "keep"
    )
    kind = "a full checkpoint (adapter merged)" if merged else "a PEFT LoRA adapter"
    body = f"""# {card.title} of the LoRA adapter `{card.post.name}`

This is {kind} for the base model {card.pre.card_text}. In the base model's softmax-attention
layers {", ".join(map(str, plan.layers))}, the adapter's changes to the query/key routing were
removed ({card.title}), so that the merged model routes attention as the base model does there;
everything else the adapter learned is kept. {card.explanation} Method: {PAPER}.

| layer | module | action | target |
|---|---|---|---|
{rows}

Made with qkrestore {__version__}:

```bash
{card.command}
```
"""
    if old_body.strip():
        body += "\n---\n\n## Model card of the input adapter\n\n" + old_body.lstrip()
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    return f"---\n{front}---\n\n{body}"


def write_card_and_provenance(
    folder: Path, card: CardInput, result: WriteResult | None = None
) -> None:
    """README.md, qkrestore.json and the local record of where the sources are, into ``folder``:
    the one writer of every output kind, with a card template per kind.

    The command is recorded with absolute paths shortened unless ``record_paths`` asks for them.
    """
    command = card.command if card.record_paths else redact_command(card.command)
    card = dataclasses.replace(card, command=command)
    post_card_path = card.post.root / CARD_NAME
    post_card = (
        post_card_path.read_text(encoding="utf-8", errors="replace")
        if post_card_path.is_file()
        else None
    )
    if card.kind == CHECKPOINT:
        assert result is not None
        text = model_card(
            card.plan,
            card.pre,
            card.post,
            command,
            post_card,
            title=card.title,
            explanation=card.explanation,
        )
        record = provenance(card.plan, card.pre, card.post, command, result, card.record_paths)
    else:
        text = adapter_card(card, post_card)
        record = adapter_provenance(card, result)
    (folder / CARD_NAME).write_text(text, encoding="utf-8")
    (folder / PROVENANCE_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    write_local_record(folder, {"pre": str(card.pre.root), "post": str(card.post.root)})


def _source(s: SourceRecord, record_paths: bool) -> dict[str, Any]:
    return {"source": s.name, "hub_id": s.hub_id} | ({"path": str(s.root)} if record_paths else {})


def adapter_provenance(card: CardInput, result: WriteResult | None) -> dict[str, Any]:
    """An adapter job's record: what ``verify`` needs to re-merge OUT with PRE and compare."""
    assert card.adapter is not None
    sources = {
        "pre": _source(card.pre, card.record_paths),
        "post": _source(card.post, card.record_paths) | {"adapter": True},
    }
    record: dict[str, Any] = {
        "tool": "qkrestore",
        "version": __version__,
        "command": card.command,
        ADAPTER_JOB_KEY: {"output_kind": card.kind},
        "sources": sources,
        "plan": card.plan.to_json(),
        **card.adapter,
    }
    if result is not None:
        record |= {"files": result.files, "tensor_sha256": result.tensor_sha256}
    return record


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
    given = {"pre": pre is not recorded["pre"], "post": post is not recorded["post"]}
    for side, path in (("pre", pre), ("post", post)):
        if not given[side] and not Path(path).exists():
            raise QKRestoreError(
                f"{out}: {side.upper()} was at {path} when OUT was written and is not there now",
                hint="pass --pre PATH and --post PATH (the folders OUT was made from, where they "
                "are now)",
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
