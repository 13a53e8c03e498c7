"""Uploads that are not media but programs for FFmpeg's demuxers: playlists and manifests that name files,
URLs and sockets, and an MP4 whose track says its media lives in another file."""

from __future__ import annotations

import struct

_CONTAINERS = (b"moov", b"trak", b"mdia", b"minf", b"dinf")


def ffconcat(*paths: str) -> bytes:
    """An ffconcat script playing `paths` (FFmpeg's concat demuxer opens each)."""
    return b"ffconcat version 1.0\n" + b"".join(f"file '{p}'\n".encode() for p in paths)


def hls(*paths: str) -> bytes:
    """An HLS media playlist whose segments are `paths`."""
    segments = b"".join(f"#EXTINF:1.0,\n{p}\n".encode() for p in paths)
    return b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n" + segments + b"#EXT-X-ENDLIST\n"


def sdp(port: int) -> bytes:
    """An SDP session: FFmpeg's sdp demuxer listens for RTP on `port` (and waits for it)."""
    return ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=clip\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=video {port} RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n").encode()


def concat_protocol(*paths: str) -> str:
    """A `concat:` URL: one stream made of `paths` read one after another."""
    return "concat:" + "|".join(paths)


def subfile(path: str) -> str:
    """A `subfile:` URL: a byte range of `path` (here the whole of it)."""
    return f"subfile,,start,0,end,0,,:{path}"


def alias_entry(path: str) -> bytes:
    """A QuickTime `alis` data reference (flags 0: not this file) naming the absolute `path`."""
    record = bytes(10) + b"\0" + bytes(27) + bytes(12) + b"\0" + bytes(63) + bytes(16) + struct.pack(">hh", -1, -1)
    record += bytes(16)
    name = path.encode()
    name += b"\0" * (len(name) % 2)
    record += struct.pack(">hH", 2, len(name)) + name + struct.pack(">hH", -1, 0)  # type 2: the absolute path
    return struct.pack(">I4sI", 12 + len(record), b"alis", 0) + record


def with_external_reference(mp4: bytes, path: str) -> bytes:
    """`mp4` (moov after mdat, as PyAV writes it) with its track's media said to be in the file at `path`."""
    out = bytearray(mp4)
    parents: list[int] = []

    def find(start: int, end: int) -> tuple[int, int] | None:
        pos = start
        while pos < end:
            size, kind = struct.unpack_from(">I4s", out, pos)
            if kind == b"dref":
                return pos, size
            if kind in _CONTAINERS and (found := find(pos + 8, pos + size)) is not None:
                parents.append(pos)
                return found
            pos += size
        return None

    found = find(0, len(out))
    assert found is not None, "no dref box"
    pos, size = found
    entry = alias_entry(path)
    dref = struct.pack(">I4sII", 16 + len(entry), b"dref", 0, 1) + entry
    out[pos:pos + size] = dref
    for parent in parents:  # every enclosing box grows by as much
        (parent_size,) = struct.unpack_from(">I", out, parent)
        struct.pack_into(">I", out, parent, parent_size + len(dref) - size)
    return bytes(out)
