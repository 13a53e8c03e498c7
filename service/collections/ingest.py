"""Items on their way into a collection: what a client sends (`IncomingItem`), checked and hashed (`Prepared`),
and the media files behind them (`MediaFiles`: paths under the media root, uploads kept content-addressed in
the collection's media folder so it can be re-embedded later)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uniadapter_serve.errors import ConflictError, InputError, MediaTooLargeError, NotFoundError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.media.image import sniff_image_type
from uniadapter_serve.model.media.video import sniff_video_type
from uniadapter_serve.service.collections.store import CollectionGone, Item
from uniadapter_serve.service.settings import Settings

MAX_PATH_CHARS = 1024
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/bmp": ".bmp",
              "image/webp": ".webp", "video/mp4": ".mp4", "video/quicktime": ".mov", "video/webm": ".webm",
              "video/x-msvideo": ".avi"}


@dataclass
class IncomingItem:
    """One item to add: media bytes, a path under the media root, or a text (text collections)."""

    id: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    path: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
    label: str
    """how errors name the item: items[i], with its filename when it has one"""
    external_id: str
    source: str
    sha256: str
    metadata: dict[str, Any]
    content: bytes | str
    """media bytes or text"""


class MediaFiles:
    def __init__(self, media_root: Path, settings: Settings) -> None:
        self.media_root = media_root
        self.settings = settings

    def prepare(self, kind: str, i: int, item: IncomingItem, check_text: Callable[[str, str], str], *,
                long: bool = False) -> Prepared:
        """Check one item against the collection's kind and read its bytes -> Prepared (a 4xx naming it); long:
        a moment collection's video (MAX_MOMENT_VIDEO_BYTES)."""
        filename = item.metadata.get("filename")
        label = f"items[{i}]" + (f" ({str(filename)[:80]})" if filename else "")
        if kind == "text":
            if item.text is None or item.data is not None or item.path is not None:
                raise ConflictError(f"{label}: a text collection takes 'text' items")
            text = check_text(item.text, f"{label}.text")
            sha = hashlib.sha256(text.encode()).hexdigest()
            return Prepared(label, item.id or sha[:16], f"text:{text}", sha, item.metadata, text)
        if item.text is not None:
            raise ConflictError(f"{label}: an {kind} collection takes files or paths, not 'text' items")
        if (item.data is None) == (item.path is None):
            raise InputError(f"{label}: give exactly one of an uploaded file and a path")
        if item.path is not None:
            path = self.resolve(item.path, f"{label}.path")
            data = self.read(path, kind, f"{label}.path", long=long)
            source = f"path:{path.relative_to(self.media_root.resolve())}"
        else:
            assert item.data is not None
            data, source = item.data, "upload"
        sha = hashlib.sha256(data).hexdigest()
        return Prepared(label, item.id or sha[:16], source, sha, item.metadata, data)

    def resolve(self, path: str, field_name: str) -> Path:
        """A file under the media root named by a client: every failure is the client's 4xx, and no
        server path appears in a message."""
        shown = repr(path[:80]) + ("..." if len(path) > 80 else "")
        if "\x00" in path:
            raise InputError(f"{field_name}: path {shown} contains a NUL byte")
        if len(path) > MAX_PATH_CHARS:
            raise InputError(f"{field_name}: path of {len(path)} characters is over the limit of {MAX_PATH_CHARS}")
        root = self.media_root.resolve()
        try:
            candidate = (root / path).resolve()
            if not candidate.is_relative_to(root):
                raise InputError(f"{field_name}: path {shown} is outside the media root")
            found = candidate.is_file()
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise InputError(f"{field_name}: path {shown} cannot be used ({reason})") from None
        if not found:
            raise NotFoundError(f"{field_name}: no file {shown} under the media root")
        return candidate

    def read(self, path: Path, kind: str, field_name: str, *, long: bool = False) -> bytes:
        s = self.settings
        video = s.max_moment_video_bytes if long else s.max_video_bytes
        limit = video if kind == "video" else s.max_image_bytes
        try:
            size = path.stat().st_size
            if size > limit:
                raise MediaTooLargeError(f"{field_name}: the file has {size} bytes, over the limit of {limit} bytes")
            return path.read_bytes()
        except OSError as e:
            raise InputError(f"{field_name}: the file cannot be read ({e.strerror or type(e).__name__})") from None

    def store(self, media_dir: Path, prepared: list[Prepared], name: str, gone: Callable[[], bool]) -> None:
        """Keep uploaded media (content-addressed) in collection `name`'s `media_dir`, before the items commit
        (a crash in between leaves files no item names: start-up removes them, see `cleanup`); `gone`: whether
        the collection is known deleted."""
        for p in prepared:
            if not p.source.startswith("upload"):
                continue
            if gone():  # never make the folder of a deleted collection again
                raise CollectionGone(name)
            assert isinstance(p.content, bytes)
            mime = sniff_image_type(p.content) or sniff_video_type(p.content) or ""
            target = media_dir / f"{p.sha256}{EXTENSIONS.get(mime, '.bin')}"
            p.source = f"upload:{target.name}"
            try:
                os.utime(target)  # there already: fresh again, so no clean-up takes it for an old orphan
                continue
            except FileNotFoundError:
                pass
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, p.content)
            except FileNotFoundError:  # its folder went away under us: another replica deleted the collection
                raise CollectionGone(name) from None

    def load(self, media_dir: Path, kind: str, item: Item, *, long: bool = False) -> bytes | str:
        """The media bytes (or text) of an item of a `kind` collection keeping its uploads in `media_dir`, for
        re-ranking and re-indexing (long: of a moment collection)."""
        source, _, rest = item.source.partition(":")
        field_name = f"item {item.external_id[:80]!r}"
        if source == "text":
            return rest
        if source == "upload":
            try:
                return (media_dir / rest).read_bytes()
            except FileNotFoundError:
                raise NotFoundError(f"{field_name}: its stored media file is missing") from None
        if source == "path":
            return self.read(self.resolve(rest, field_name), kind, field_name, long=long)
        raise NotFoundError(f"{field_name} has no stored media")
