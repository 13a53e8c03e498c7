"""What a crash leaves on the data volume, removed at start-up: uploaded media that no committed item references
(an add stores its media before its transaction commits), temp files of interrupted atomic writes, and
collection folders half made or half deleted.

Another process may be in the middle of an add right now (replicas share the volume), so a file is removed only
when it is older than `ORPHAN_GRACE_S`, unless this process knows it is alone: every serving process holds a
shared lock on `.serving` in the folder all of them write into (SQLite: DATA_ROOT/collections; PostgreSQL: the
shared media root's `.collections`, a lock other hosts see where the shared filesystem supports locks, as NFS v4
does); a process that gets it exclusively at start is the only one serving.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from uniadapter_serve.service.collections.store import Swept

log = logging.getLogger(__name__)

ORPHAN_GRACE_S = 3600.0
"""An unreferenced file younger than this may belong to an add still in flight in another process."""
UPLOAD = "upload:"


class ServingLock:
    """Held (shared) by every serving process on a data root while it runs."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = (root / ".serving").open("a+b")

    def alone(self) -> bool:
        """Take the lock exclusively if nobody else holds it (then keep it shared): True if this process is the
        only one serving this root."""
        assert self._file is not None
        fd = self._file.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alone = True
        except BlockingIOError:
            alone = False
        fcntl.flock(fd, fcntl.LOCK_SH)
        return alone

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None


def _old(path: Path, min_age_s: float, now: float) -> bool:
    try:
        return now - path.lstat().st_mtime >= min_age_s
    except FileNotFoundError:
        return False


def is_temp(path: Path) -> bool:
    """A temp file of `fileio.atomic_write` (`.NAME.XXXXXXXX.tmp`)."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def remove_temp(folders: Iterable[Path], min_age_s: float, now: float | None = None) -> int:
    """Temp files of interrupted atomic writes in `folders` (not below them)."""
    now = time.time() if now is None else now
    removed = 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if is_temp(path) and path.is_file() and _old(path, min_age_s, now):
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def remove_orphan_media(media_dir: Path, sources: Iterable[str], min_age_s: float, now: float | None = None) -> Swept:
    """Files of `media_dir` that no item source (`upload:FILE`) names, and its temp files."""
    now = time.time() if now is None else now
    swept = Swept(temp=remove_temp([media_dir], min_age_s, now))
    if not media_dir.is_dir():
        return swept
    referenced = {s[len(UPLOAD):] for s in sources if s.startswith(UPLOAD)}
    for path in media_dir.iterdir():
        if path.name in referenced or is_temp(path) or not path.is_file():
            continue
        if _old(path, min_age_s, now):
            path.unlink(missing_ok=True)
            swept.media += 1
    return swept


def remove_dead_media_dirs(parent: Path, live: set[str], min_age_s: float, now: float | None = None) -> Swept:
    """Media folders under `parent` (one per collection name) of no live collection: their old files, then the
    folder once empty."""
    now = time.time() if now is None else now
    swept = Swept()
    if not parent.is_dir():
        return swept
    for folder in parent.iterdir():
        if folder.name in live or not folder.is_dir():
            continue
        swept += remove_orphan_media(folder, (), min_age_s, now)
        try:
            os.rmdir(folder)
            swept.folders += 1
        except OSError:  # files younger than the grace stay, and so does their folder
            pass
    return swept
