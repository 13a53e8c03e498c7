"""Uploads that are programs for FFmpeg's demuxers (ffconcat and HLS playlists naming server files, SDP, the
`concat:` and `subfile:` protocols, an MP4 whose media is said to be in another file), sent to every route that
decodes video on the session's real server: each is answered 415 at once, and none opens a file.

The proof that nothing is opened: the playlists name a FIFO in the server's media root. Opening a FIFO for reading
blocks until a writer comes, and only this test writes; so a server that opened it would hang the request (the
timing bound fails), and after each answer `os.open(fifo, O_WRONLY | O_NONBLOCK)` must fail with ENXIO, which
says no process has it open for reading. The issue's own attack, an ffconcat naming a stored upload by its path
relative to the server's working directory, is sent as well: it must be 415, not 200 with that file's answer."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from support.hostile import concat_protocol, ffconcat, hls, sdp, subfile, with_external_reference
from support.keys import ADMIN_KEY, READ_KEY
from support.media import video_bytes
from support.server import free_port

QUESTION = "what colour is it?"
COLLECTION = "hostile-vid"
FAST_S = 1.0
"""Refusals come before any decode: far below this even on a loaded machine."""
CLIP = video_bytes([(220, 30, 30)] * 8)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Traps:
    def __init__(self, root: Path, server_cwd: Path, stored: Path) -> None:
        self.root, self.fifo = root, root / "trap.mp4"
        os.mkfifo(self.fifo)
        rel_fifo, abs_fifo = os.path.relpath(self.fifo, server_cwd), str(self.fifo)
        self.payloads = {
            "ffconcat-stored-upload": ffconcat(os.path.relpath(stored, server_cwd)),  # the attack
            "ffconcat-relative": ffconcat(rel_fifo),
            "ffconcat-absolute": ffconcat(abs_fifo),
            "ffconcat-concat-protocol": ffconcat(concat_protocol(rel_fifo, rel_fifo)),
            "ffconcat-subfile": ffconcat(subfile(abs_fifo)),
            "hls-relative": hls(rel_fifo),
            "hls-absolute": hls(abs_fifo),
            "hls-concat-protocol": hls(concat_protocol(abs_fifo)),
            "hls-file-url": hls(f"file://{abs_fifo}"),
            "sdp": sdp(free_port()),
            "mp4-external-reference": with_external_reference(CLIP, abs_fifo),
        }

    def assert_never_opened(self) -> None:
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            assert e.errno == errno.ENXIO, e  # no reader: nobody opened the FIFO
            return
        os.close(fd)  # a reader is blocked on it: let it go (it reads an empty file) before failing
        pytest.fail("the server opened the file a hostile upload named")


@pytest.fixture(scope="module")
def traps(server, admin_client: httpx.Client, data_root: Path) -> Iterator[Traps]:
    r = admin_client.post("/collections", json={"name": COLLECTION, "kind": "video", "adapter": "ret-video"})
    assert r.status_code == 201, r.text
    r = admin_client.post(f"/collections/{COLLECTION}/items", json={"items": [{"id": "clip", "video": b64(CLIP)}]})
    assert r.status_code == 201, r.text
    stored = next(data_root.rglob(f"{hashlib.sha256(CLIP).hexdigest()}.*"))  # the upload as the server keeps it
    root = data_root / "media" / "hostile"
    root.mkdir(parents=True, exist_ok=True)
    server_cwd = Path(os.readlink(f"/proc/{server.process.pid}/cwd"))
    yield Traps(root, server_cwd, stored)
    shutil.rmtree(root)
    admin_client.delete(f"/collections/{COLLECTION}")


@pytest.fixture(scope="module")
def admin_client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": ADMIN_KEY}, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def read_client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {READ_KEY}"}, timeout=10) as c:
        yield c


ROUTES: dict[str, Callable[[httpx.Client, bytes], httpx.Response]] = {
    "videoqa-json": lambda c, data: c.post("/videoqa", json={"video": b64(data), "question": QUESTION,
                                                             "adapter": "video-a"}),
    "videoqa-multipart": lambda c, data: c.post("/videoqa", files={"video": ("clip.mp4", data, "video/mp4")},
                                                data={"question": QUESTION, "adapter": "video-a"}),
    "retrieve-query-video": lambda c, data: c.post("/retrieve", json={"query_video": b64(data),
                                                                      "collection": COLLECTION}),
    "collection-add": lambda c, data: c.post(f"/collections/{COLLECTION}/items",
                                             json={"items": [{"id": "hostile", "video": b64(data)}]}),
}
PAYLOADS = ["ffconcat-stored-upload", "ffconcat-relative", "ffconcat-absolute", "ffconcat-concat-protocol",
            "ffconcat-subfile", "hls-relative", "hls-absolute", "hls-concat-protocol", "hls-file-url", "sdp",
            "mp4-external-reference"]


def refused_at_once(traps: Traps, send: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    try:
        r = send()
    finally:
        traps.assert_never_opened()  # first: it also frees a server thread that did open the FIFO
    elapsed = time.monotonic() - started
    assert r.status_code == 415, r.text
    assert set(r.json()) == {"error", "detail"} and r.json()["error"] == "UnsupportedMediaTypeError", r.text
    assert elapsed < FAST_S, f"{elapsed:.3f} s"
    return r, elapsed


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("payload", PAYLOADS)
def test_hostile_video_is_refused_at_once_and_opens_nothing(traps, read_client, admin_client, payload, route):
    data = traps.payloads[payload]
    c = admin_client if route == "collection-add" else read_client  # each with the key the route needs
    r, _ = refused_at_once(traps, lambda: ROUTES[route](c, data))
    detail = r.json()["detail"]
    assert ("external data reference" in detail if payload.startswith("mp4") else
            "not a video container the service accepts" in detail), detail
    assert admin_client.get(f"/collections/{COLLECTION}").json()["items"] == 1  # nothing added


def test_a_stored_file_swapped_for_a_playlist_gets_no_thumbnail(traps, read_client, admin_client):
    """A path item's file is the media root's: replaced after the add, its thumbnail is still only ever decoded
    from an accepted container."""
    (traps.root / "linked.mp4").write_bytes(CLIP)
    r = admin_client.post(f"/collections/{COLLECTION}/items",
                          json={"items": [{"id": "linked", "path": "hostile/linked.mp4"}]})
    assert r.status_code == 201, r.text
    try:
        for payload in ("ffconcat-absolute", "hls-relative", "sdp"):
            (traps.root / "linked.mp4").write_bytes(traps.payloads[payload])
            refused_at_once(traps, lambda: read_client.get(f"/collections/{COLLECTION}/items/linked/thumbnail"))
    finally:
        admin_client.delete(f"/collections/{COLLECTION}/items/linked")


def test_the_accepted_containers_still_answer(traps, read_client):
    for fmt, codec in (("mp4", "libx264"), ("mov", "libx264"), ("matroska", "libx264"), ("webm", "libvpx-vp9"),
                       ("avi", "mjpeg")):
        clip = video_bytes([(30, 30, 220)] * 8, codec=codec, fmt=fmt)
        r = ROUTES["videoqa-multipart"](read_client, clip)
        assert r.status_code == 200, (fmt, r.text)
