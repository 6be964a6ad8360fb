"""Is POST a PEFT adapter? Local folders by their files, Hub repos by one small probe."""

from __future__ import annotations

from pathlib import Path

from ..errors import QKRestoreError
from ..io.hub import Source, download_files, fetch_post, parse_source
from .config import CONFIG_NAME as ADAPTER_CONFIG
from .config import is_adapter_folder


def adapter_source(post: str) -> tuple[Source, Path] | None:
    """POST's source and local folder when it is a PEFT adapter, else ``None``.

    A Hub POST is probed by fetching ``adapter_config.json`` alone, so that a full checkpoint's
    dry run still downloads nothing; an adapter repo is then fetched whole (it is small).
    """
    src = parse_source(post)
    if not src.is_hub:
        return (src, Path(post)) if is_adapter_folder(post) else None
    try:
        probe = download_files(src, [ADAPTER_CONFIG])
    except QKRestoreError:
        return None  # the ordinary path reports an unreachable or missing repo
    if not (probe / ADAPTER_CONFIG).is_file():
        return None
    return src, fetch_post(src)
