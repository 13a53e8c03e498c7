"""Which video containers an upload may be in, told from its first bytes, and how FFmpeg is told to open them.

Left to itself FFmpeg probes every demuxer it has, and some are programs rather than containers: ffconcat and
HLS playlists, SDP and DASH manifests open the files, URLs and sockets the bytes name. So the demuxer is chosen
here, from magic bytes, before FFmpeg sees the data; FFmpeg is told to use that one (no probing), with no
protocol allowed (PyAV reads the upload through its own in-memory I/O, which needs none, so any nested open,
`file:`, `concat:`, `http:`, `subfile:`, `rtp:`..., is refused), and MP4/MOV data references stay off.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

ACCEPTED = "MP4/MOV, WebM/Matroska, AVI or GIF"
"""The containers the service documents, for error messages."""
NO_PROTOCOLS = "none"
"""A protocol whitelist naming no real protocol: FFmpeg opens nothing besides the in-memory input."""


@dataclass(frozen=True)
class VideoContainer:
    mime: str
    demuxer: str
    """FFmpeg demuxer name, forced (FFmpeg never probes the others)"""
    options: Mapping[str, str] = field(default_factory=dict)
    """demuxer-private options on top of the common ones"""

    def open_options(self) -> dict[str, str]:
        """Options for `av.open(..., container_options=...)`."""
        return {"protocol_whitelist": NO_PROTOCOLS, "format_whitelist": self.demuxer, **self.options}


MOV = VideoContainer("video/mp4", "mov", {"enable_drefs": "0", "use_absolute_path": "0"})
QUICKTIME = VideoContainer("video/quicktime", "mov", MOV.options)
MATROSKA = VideoContainer("video/webm", "matroska")
AVI = VideoContainer("video/x-msvideo", "avi")
GIF = VideoContainer("image/gif", "gif")
QUICKTIME_ATOMS = frozenset({b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"})
"""First atoms of QuickTime files older than `ftyp`."""
AUDIO_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (8, b"WAVE", "audio/wav"), (0, b"ID3", "audio/mpeg"), (0, b"fLaC", "audio/flac"),
)
"""(offset, magic, type) of audio files, only to say why they are refused."""


def video_container(data: bytes) -> VideoContainer | None:
    """The accepted container the bytes start as (GIF included), or None."""
    if data[4:8] == b"ftyp":
        return MOV
    if data[4:8] in QUICKTIME_ATOMS:
        return QUICKTIME
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return MATROSKA
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return AVI
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return GIF
    return None


def sniff_video_type(data: bytes) -> str | None:
    """Video type of an accepted container from magic bytes, or None (GIF is an image type: None here)."""
    container = video_container(data)
    return container.mime if container is not None and container is not GIF else None


def sniff_audio_type(data: bytes) -> str | None:
    for offset, magic, mime in AUDIO_SIGNATURES:
        if data[offset:offset + len(magic)] == magic:
            return mime
    return None


# -- MP4/MOV data references --------------------------------------------------------------------------

_DREF_PATH = (b"moov", b"trak", b"mdia", b"minf", b"dinf", b"dref")
MAX_BOXES = 10_000
"""Boxes looked at at most: real files have tens; the walk must not become the cost of a hostile one."""
SELF_CONTAINED = 0x000001
"""Data reference flag: the media is in this file."""


def mov_external_reference(data: bytes) -> bool:
    """Whether an MP4/MOV file says its media lives in another file (a data reference that is not "this file").
    FFmpeg never follows one here (`enable_drefs` is off), so such a file cannot be decoded as sent."""
    budget = [MAX_BOXES]
    return any(_external(data, entry) for entry in _drefs(data, 0, len(data), 0, budget))


def _external(data: bytes, box: tuple[int, int, int]) -> bool:
    start, header, end = box
    body = start + header
    if end - body < 8:
        return False
    (count,) = struct.unpack_from(">I", data, body + 4)
    pos = body + 8
    for _ in range(min(count, MAX_BOXES)):
        if end - pos < 12:
            break
        size, kind, flags = struct.unpack_from(">I4sI", data, pos)
        if size < 12 or pos + size > end:
            break
        if not flags & SELF_CONTAINED or (kind == b"alis" and size > 12):  # FFmpeg reads a path from any alis
            return True
        pos += size
    return False


def _drefs(data: bytes, start: int, end: int, depth: int, budget: list[int]) -> Iterator[tuple[int, int, int]]:
    """(start, header size, end) of every `dref` box on the moov/trak/.../dref path."""
    for box_start, header, kind, box_end in _boxes(data, start, end, budget):
        if kind != _DREF_PATH[depth]:
            continue
        if depth == len(_DREF_PATH) - 1:
            yield box_start, header, box_end
        else:
            yield from _drefs(data, box_start + header, box_end, depth + 1, budget)
        if depth == 0:
            return  # FFmpeg reads the first moov only


def _boxes(data: bytes, start: int, end: int, budget: list[int]) -> Iterator[tuple[int, int, bytes, int]]:
    pos = start
    while end - pos >= 8 and budget[0] > 0:
        budget[0] -= 1
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # 64-bit size follows
            if end - pos < 16:
                return
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:  # to the end
            size = end - pos
        if size < header or pos + size > end:
            return
        yield pos, header, kind, pos + size
        pos += size
