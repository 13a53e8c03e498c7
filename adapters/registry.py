"""The adapters root on disk: one sub-folder per set name, one folder per version inside.

    root/
      coco-retrieval/
        3f9a1c0e4b2d/            adapter_config.json + adapter_model.safetensors
        8e11aa02c4f7/
      vqa/                       a set folder directly under its name is one version too
        adapter_config.json      (+ golden.json, its golden record, when it has one)
        adapter_config.json

`name` resolves to the newest version, `name@version` to exactly that one. Newest means most
recently published: publishing stamps the version folder with the server's time (`published.json`),
so the `created` field a client uploads cannot reorder versions, and publishing an existing version
again makes it the newest (a rollback). Folders with no stamp (copied in by hand) fall back to their
`created` time. Publishing writes the new version into a temporary folder and renames it into place,
so a reader never sees a half-written version.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from uniadapter_serve.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterSetMeta,
    BackboneInfo,
    file_key,
    read_adapter_meta,
    save_adapter_set,
)
from uniadapter_serve.adapters.golden import GOLDEN_FILE, GoldenRecord, write_record
from uniadapter_serve.errors import AdapterError, AdapterNotFoundError, AdapterVersionNotFoundError, ConfigError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.uniadapter import AdapterSetModule

log = logging.getLogger(__name__)

NAME_BODY = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
"""Set and collection names: folder names on every replica's volume, so ASCII only."""
NAME_RE = re.compile(rf"\A{NAME_BODY}\Z")
"""Anchored at both ends of the string, not with ^...$ (`$` also matches before a final newline, so a name
ending in a newline would pass): `.match`, `.fullmatch` and `.search` all check the whole name."""
PUBLISHED_FILE = "published.json"


def _published_record() -> bytes:
    now = time.time_ns()
    stamp = dt.datetime.fromtimestamp(now / 1e9, dt.timezone.utc).isoformat(timespec="microseconds")
    return (json.dumps({"published": stamp, "published_ns": now}) + "\n").encode()


def _read_published(folder: Path, created: str) -> tuple[int, str]:
    """(order key in ns, ISO time) of a version: its publish stamp, else its `created` time."""
    try:
        record = json.loads((folder / PUBLISHED_FILE).read_text())
        return int(record["published_ns"]), str(record["published"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        when = dt.datetime.fromisoformat(created)
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return int(when.timestamp() * 1e9), created
    except ValueError:
        return 0, created


def parse_ref(ref: str) -> tuple[str, str | None]:
    """'name' -> (name, None); 'name@version' -> (name, version). Validates the name."""
    name, sep, version = ref.partition("@")
    if not NAME_RE.fullmatch(name):
        raise AdapterNotFoundError(
            f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if sep and not re.fullmatch(r"[0-9a-f]{4,64}", version):
        raise AdapterVersionNotFoundError(f"invalid adapter version {version!r}: expected hex digits")
    return name, (version if sep else None)


class AdapterRegistry:
    """What exists on disk. Thread-safe; rescans lazily (a cache keyed by file size and mtime
    keeps the weight hashes of unchanged files)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._lock = threading.RLock()
        self._versions: dict[str, list[AdapterSetMeta]] = {}
        self._errors: dict[str, str] = {}
        self._published: dict[str, tuple[int, str]] = {}
        self._cache: dict[Path, AdapterSetMeta] = {}
        self._last_refresh = 0.0
        self.refresh_on_miss_every_s = 1.0
        """A lookup miss rescans the disk at most this often (unknown names must not trigger a scan each)."""
        self.max_staleness_s = 5.0
        """Any lookup rescans when the last scan is older: replicas without Redis events still see new
        versions within seconds (a scan re-hashes nothing that did not change)."""

    def refresh(self) -> None:
        self._last_refresh = time.monotonic()
        versions: dict[str, list[AdapterSetMeta]] = {}
        errors: dict[str, str] = {}
        published: dict[str, tuple[int, str]] = {}
        if self.root.is_dir():
            for config in sorted(self.root.glob(f"*/{CONFIG_FILE}")) + sorted(self.root.glob(f"*/*/{CONFIG_FILE}")):
                folder = config.parent
                if any(part.startswith(".") for part in folder.relative_to(self.root).parts):
                    continue  # temporary folders of an ongoing publish
                where = str(folder.relative_to(self.root))  # messages never show server paths
                try:
                    meta = self._read(folder)
                except AdapterError as e:
                    errors[where] = str(e).replace(str(self.root) + os.sep, "")
                    continue
                name = folder.relative_to(self.root).parts[0]
                if meta.name != name:
                    errors[where] = f"set name {meta.name!r} does not match its folder {name!r}"
                    continue
                versions.setdefault(name, []).append(meta)
                published[meta.ref] = _read_published(folder, meta.created)
        for metas in versions.values():
            metas.sort(key=lambda m: (published[m.ref][0], m.version), reverse=True)
        with self._lock:
            self._versions, self._errors, self._published = versions, errors, published

    def _read(self, folder: Path) -> AdapterSetMeta:
        cached = self._cache.get(folder)
        if cached is not None and cached.file_key is not None and cached.file_key == file_key(folder):
            return cached
        meta = read_adapter_meta(folder)
        self._cache[folder] = meta
        return meta

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._versions)

    def versions(self, name: str) -> list[AdapterSetMeta]:
        """Newest first."""
        with self._lock:
            return list(self._versions.get(name, []))

    def published(self, meta: AdapterSetMeta) -> str:
        """When the version was (last) published here, ISO 8601; its `created` time if never stamped."""
        with self._lock:
            return self._published.get(meta.ref, (0, meta.created))[1]

    def errors(self) -> dict[str, str]:
        """Folders that look like sets but could not be read, with the reason."""
        with self._lock:
            return dict(self._errors)

    def all(self) -> list[AdapterSetMeta]:
        with self._lock:
            return [m for name in sorted(self._versions) for m in self._versions[name]]

    def resolve(self, ref: str) -> AdapterSetMeta:
        """'name' -> newest version; 'name@version' (or a unique prefix of it) -> that version."""
        name, version = parse_ref(ref)
        if time.monotonic() - self._last_refresh > self.max_staleness_s:
            self.refresh()
        meta = self._find(name, version)
        if meta is None and (time.monotonic() - self._last_refresh >= self.refresh_on_miss_every_s
                             or self._on_disk(name, version)):
            self.refresh()  # maybe it appeared on disk since the last scan
            meta = self._find(name, version)
        if meta is not None:
            return meta
        if not self.versions(name):
            raise AdapterNotFoundError(f"no adapter set named {name!r}")
        raise AdapterVersionNotFoundError(f"adapter set {name!r} has no version {version!r}")

    def _on_disk(self, name: str, version: str | None) -> bool:
        """An exact version we do not list yet has its folder: another process published it since our last
        scan (a replica asked for the version its ingress just published). One stat, so a miss on a version
        that is not there still rescans only at the rate limit."""
        return version is not None and (self.root / name / version / CONFIG_FILE).is_file()

    def _find(self, name: str, version: str | None) -> AdapterSetMeta | None:
        metas = self.versions(name)
        if version is None:
            return metas[0] if metas else None
        hits = [m for m in metas if m.version.startswith(version)]
        return hits[0] if len(hits) == 1 else None

    def publish(self, module: AdapterSetModule, name: str, backbone: BackboneInfo, *,
                answer_list: list[str] | None = None, extra: dict[str, Any] | None = None,
                golden: Callable[[AdapterSetMeta], GoldenRecord] | None = None) -> AdapterSetMeta:
        """Write `module` as a new version of `name` and make it the newest; `golden` makes its record (e.g.
        `lambda meta: prober.record(module, ref=meta.ref, answer_list=meta.answer_list)`), written with it."""
        parse_ref(name)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            version = save_adapter_set(module, staging, name=name, backbone=backbone, answer_list=answer_list,
                                       extra=extra)
            if golden is not None:
                write_record(staging, golden(read_adapter_meta(staging)))
            return self._install(staging, name, version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def publish_folder(self, source: str | Path, name: str | None = None) -> AdapterSetMeta:
        """Copy a validated set folder in as a new version (its own name unless `name` is given)."""
        meta = read_adapter_meta(source)
        name = name or meta.name
        if name != meta.name:
            raise ConfigError(f"set folder is named {meta.name!r} in its config, not {name!r}")
        parse_ref(name)
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            for file in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(Path(source) / file, staging / file)
            if (Path(source) / GOLDEN_FILE).is_file():  # its golden record travels with it (checked at load)
                shutil.copy2(Path(source) / GOLDEN_FILE, staging / GOLDEN_FILE)
            return self._install(staging, name, meta.version)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _install(self, staging: Path, name: str, version: str) -> AdapterSetMeta:
        target = self.root / name / version
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            (staging / PUBLISHED_FILE).write_bytes(_published_record())
            os.replace(staging, target)
        else:
            log.info("adapter set %s@%s was published before: it becomes the newest again", name, version)
            atomic_write(target / PUBLISHED_FILE, _published_record())
        self.refresh()
        return self.resolve(f"{name}@{version}")
