"""Hugging Face Hub sources and uploads.

PRE and POST may be local folders or Hub repos (``org/name``, ``org/name@revision``,
``hf://org/name``). Hub repos are resolved with ``huggingface_hub.snapshot_download``, so the HF cache,
``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1`` and tokens behave as they do everywhere else.

POST is fetched whole (less other weight formats, which would carry unrestored weights). PRE is
fetched in two steps: its config and index first, then only the shards that hold planned tensors,
so restoring a few layers of a 100 GB model downloads a few hundred megabytes of PRE.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, QKRestoreError
from .checkpoint import CONFIG_NAME, INDEX_NAME, Checkpoint, Shard, TensorInfo, read_config
from .weightfiles import OTHER_FORMAT_PATTERNS

# Where an output records the local paths of its sources (for ``verify``); uploads leave it out.
LOCAL_RECORD_DIR = ".cache/qkrestore"

HUB_PATTERN = re.compile(
    r"^(?:hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$"
)
META_FILES = [CONFIG_NAME, INDEX_NAME]
FOREIGN_WEIGHTS = OTHER_FORMAT_PATTERNS  # the one list lives in qkrestore.io.weightfiles


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from, as the user wrote it."""

    text: str
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    @property
    def repo(self) -> str:
        """The repo id of a Hub source (asked for only where ``is_hub`` holds)."""
        if self.repo_id is None:
            raise QKRestoreError(f"{self.text}: not a Hub repo id")
        return self.repo_id


def parse_source(text: str) -> Source:
    """A local folder if one exists at ``text`` (or it looks like a path), else a Hub repo id."""
    if text.startswith("hf://"):
        m = HUB_PATTERN.match(text)
        if not m:
            raise QKRestoreError(f"{text}: not a Hub repo id (expected hf://org/name[@revision])")
        return Source(text, m.group("repo"), m.group("rev"))
    if Path(text).exists() or text.startswith((".", "/", "~")) or os.sep * 2 in text:
        return Source(text)
    m = HUB_PATTERN.match(text)
    if m and text.count("/") >= 1:
        return Source(text, m.group("repo"), m.group("rev"))
    return Source(text)


def hub_id_for(source: Source, root: Path, config: Mapping[str, Any]) -> str | None:
    """The Hub id a checkpoint is known by, so that a model card can name it without local paths.

    In order: the id it was given as; the Hugging Face cache entry its folder lies in (a snapshot
    folder is ``…/models--org--name/snapshots/<commit>``, see huggingface_hub's cache layout); its
    config's ``_name_or_path`` when that names a Hub repo rather than a folder. ``None`` when none
    of them does.
    """
    if source.repo_id:
        return source.repo_id
    parts = Path(root).absolute().parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            org_name = part.removeprefix("models--").split("--", 1)
            if len(org_name) == 2 and all(org_name):
                return "/".join(org_name)
    name = config.get("_name_or_path")
    if (
        isinstance(name, str)
        and HUB_PATTERN.fullmatch(name)
        and not name.startswith(("hf://", ".", "/", "~"))
        and "@" not in name
        and not Path(name).exists()
    ):
        return name
    return None


def download_hint(source: Source) -> str:
    """The ``hf`` command that fills the cache with ``source`` (``hf download`` takes the revision
    as ``--revision``, not as ``org/name@rev``)."""
    rev = f" --revision {source.revision}" if source.revision else ""
    return f"download it first with 'hf download {source.repo_id}{rev}'"


def not_cached_reason() -> str:
    """Why a Hub source that is not in the local cache could not be fetched: downloads are off
    (``HF_HUB_OFFLINE`` is set), or the Hub (``HF_ENDPOINT``) could not be reached."""
    from huggingface_hub import constants

    if is_offline():
        return (
            "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set (unset it to download)"
        )
    return f"not in the local Hugging Face cache, and {constants.ENDPOINT} cannot be reached"


def _download(source: Source, **patterns: Any) -> Path:
    return Path(_snapshot(source, **patterns))


def _snapshot(source: Source, **kwargs: Any) -> Any:
    """``snapshot_download`` of a Hub source, every failure one line naming the repo (no route,
    offline, no such repo or revision, gated, an HTTP client error raised raw)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = source.repo + (f"@{source.revision}" if source.revision else "")
    try:
        return snapshot_download(source.repo, revision=source.revision, **kwargs)
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{where}: {not_cached_reason()}", hint=download_hint(source)
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{where}: no such model repo on the Hub (or it is private)",
            hint="check the name, or log in with 'hf auth login'",
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{where}: no such revision") from None
    except GatedRepoError:
        raise CheckpointError(
            f"{where}: gated repo", hint="accept its terms on the Hub and log in"
        ) from None
    except _network_errors() as exc:
        raise CheckpointError(f"{where}: download failed ({type(exc).__name__}: {exc})") from None


def fetch_post(source: Source) -> Path:
    return (
        _download(source, ignore_patterns=FOREIGN_WEIGHTS) if source.is_hub else Path(source.text)
    )


def download_files(source: Source, patterns: list[str]) -> Path:
    """Only the files matching ``patterns`` (e.g. probing a repo for ``adapter_config.json``)."""
    return _download(source, allow_patterns=patterns)


def pre_shards_needed(weight_map: Mapping[str, str], names: Iterable[str]) -> list[str]:
    """The shard files of PRE that hold the given tensors (the only ones worth downloading)."""
    missing = [n for n in names if n not in weight_map]
    if missing:
        raise CheckpointError(f"PRE's index has no tensor '{missing[0]}'")
    return sorted({weight_map[n] for n in names})


def fetch_pre(source: Source, needed_names: Callable[[Path], list[str]]) -> Path:
    """PRE's config and index, then only the shards that hold ``needed_names(meta_folder)``."""
    if not source.is_hub:
        return Path(source.text)
    meta = _download(source, allow_patterns=META_FILES)
    index = meta / INDEX_NAME
    if not index.is_file():
        return _download(source, allow_patterns=[*META_FILES, "model.safetensors"])
    import json

    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    shards = pre_shards_needed(weight_map, needed_names(meta))
    return _download(source, allow_patterns=[*META_FILES, *shards])


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def metadata_view(source: Source) -> Checkpoint:
    """A checkpoint view from headers alone, for planning a dry run before any weight is fetched.

    Online, headers are read with HTTP range requests (``get_safetensors_metadata``); offline,
    the cached snapshot is opened (nothing is fetched either way).
    """
    if not source.is_hub:
        return Checkpoint.open(source.text)
    if is_offline():
        return Checkpoint.open(_download(source, ignore_patterns=FOREIGN_WEIGHTS), partial=True)
    from huggingface_hub import get_safetensors_metadata

    meta_dir = _download(source, allow_patterns=META_FILES)
    config = read_config(meta_dir)
    try:
        remote = get_safetensors_metadata(source.repo, revision=source.revision)
    except Exception as exc:
        raise CheckpointError(
            f"{source.repo_id}: cannot read safetensors headers ({exc})"
        ) from None
    shards: dict[str, Shard] = {}
    tensors: dict[str, TensorInfo] = {}
    for file, fm in remote.files_metadata.items():
        names = []
        for name, t in fm.tensors.items():
            begin, end = t.data_offsets
            tensors[name] = TensorInfo(name, file, t.dtype, tuple(t.shape), begin, end - begin)
            names.append(name)
        shards[file] = Shard(file, Path(file), 0, 0, fm.metadata, tuple(names))
    return Checkpoint(root=meta_dir, config=config, shards=shards, tensors=tensors)


def download_list(
    source: Source, allow: list[str] | None = None, ignore: list[str] | None = None
) -> list[dict[str, Any]]:
    """The files a run would fetch, with sizes, without fetching them."""
    if not source.is_hub:
        return []
    if not is_offline():
        infos = _snapshot(source, allow_patterns=allow, ignore_patterns=ignore, dry_run=True)
        return [
            {"file": i.filename, "size": i.file_size, "cached": i.is_cached}  # type: ignore[union-attr]
            for i in infos
        ]
    snap = _download(source, allow_patterns=allow, ignore_patterns=ignore)
    from fnmatch import fnmatch

    files = []
    for f in sorted(snap.iterdir()):
        if allow is not None and not any(fnmatch(f.name, a) for a in allow):
            continue
        if ignore is not None and any(fnmatch(f.name, i) for i in ignore):
            continue
        files.append({"file": f.name, "size": f.stat().st_size, "cached": True})
    return files


class PushError(QKRestoreError):
    """An upload could not start or did not finish. Raised after OUT is written, it says so and how
    to retry (``qkrestore push OUT ID``): OUT itself is never touched by a push."""


def login_problem() -> str | None:
    """Why a push cannot start, or ``None``: offline mode, or no Hub token (``HF_TOKEN``, the token
    file under ``HF_HOME``). Found without any network call, so a run with ``--push-to-hub`` can
    refuse before it writes anything rather than after."""
    from huggingface_hub import get_token

    if is_offline():
        return "HF_HUB_OFFLINE is set, so nothing can be uploaded (unset it to push)"
    if not get_token():
        return "not logged in to the Hugging Face Hub (run 'hf auth login' or set HF_TOKEN)"
    return None


def check_push_login(repo_id: str) -> None:
    """Refuse a push that cannot start, before any other work (see :func:`login_problem`)."""
    problem = login_problem()
    if problem:
        raise PushError(f"--push-to-hub {repo_id}: {problem}")


def _network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub lets through when the Hub cannot be reached or answers with an error:
    its own ``HfHubHTTPError``/``OfflineModeIsEnabled`` (both ``OSError``) and the HTTP client's
    errors, raised raw (``httpx``, or ``httpx2`` in newer huggingface_hub, or ``requests``)."""
    import importlib

    found: list[type[BaseException]] = [OSError]
    for module, name in (
        ("httpx2", "HTTPError"),
        ("httpx", "HTTPError"),
        ("requests", "RequestException"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    message: str,
    check: Callable[[Path], None] | None = None,
) -> str:
    """Check the login, then ``check(folder)`` (the caller's verification: a push publishes what
    ``qkrestore verify`` passes, or nothing), then create the repo if needed and upload it; returns
    the commit URL. Every failure is a :class:`PushError` (or the check's own error) whose line
    says that ``folder`` is intact and how to retry; nothing here writes to ``folder``."""
    retry = f"{folder} is written and intact; retry with 'qkrestore push {folder} {repo_id}'"
    problem = login_problem()
    if problem:
        raise PushError(f"{repo_id}: not pushed: {problem}", hint=retry)
    if check is not None:
        check(folder)
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=[f"{LOCAL_RECORD_DIR}/*"],  # where PRE/POST are on this machine
        )
    except _network_errors() as exc:
        from huggingface_hub import constants

        what = (str(exc).strip().splitlines() or [""])[0]
        raise PushError(
            f"{repo_id}: upload to {constants.ENDPOINT} failed ({type(exc).__name__}: {what})",
            hint=retry,
        ) from None
    return str(getattr(info, "commit_url", info))
