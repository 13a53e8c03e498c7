"""Bulk adds of large images beside task routes, in-process (support.asgi) on an app whose decode budget fits two:
the add queues for the budget up to its deadline (not DECODE_WAIT_S) and succeeds; bulk work holds at most its
share, so a /vqa meanwhile gets decode room at once; an add that outlives its deadline is 504 and stores
nothing."""

from __future__ import annotations

import base64
import io
import re
import threading
import time
import zlib

import httpx
import pytest
from PIL import Image, ImageDraw
from support.asgi import running_app
from support.keys import ADMIN_KEY, READ_KEY
from support.media import image_bytes
from support.waiting import until

SIDE = 2000
PIXELS = SIDE * SIDE
"""every item needs the whole bulk share: bulk decodes run one at a time"""
ITEMS = 48
SETTINGS = {"api_key": READ_KEY, "admin_key": ADMIN_KEY, "max_image_pixels": PIXELS,
            "decode_budget_mpix": 2 * PIXELS / 1e6, "decode_bulk_share": 0.5, "max_video_pixels": 400_000,
            "max_image_bytes": 1_000_000, "max_request_bytes": 20_000_000}
"""decode_wait_s=0 in the first test: a task decode (or a bulk one, if it were applied to them) that has to wait
at all fails at once"""


def big_pngs(n: int) -> list[bytes]:
    """n distinct files (no embedding-cache hits) of a few KB, each decoding to SIDE x SIDE pixels: one
    encoded image, each copy with its own text chunk after the header."""
    image = Image.new("RGB", (SIDE, SIDE), (200, 40, 40))
    ImageDraw.Draw(image).ellipse((SIDE // 4, SIDE // 4, 3 * SIDE // 4, 3 * SIDE // 4), fill=(30, 60, 220))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    png = buf.getvalue()
    header = 8 + 25  # signature + IHDR chunk

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    return [png[:header] + chunk(b"tEXt", b"copy\x00%d" % i) + png[header:] for i in range(n)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def samples(c: httpx.Client, name: str) -> dict[str, float]:
    """label value of `class` -> value, for one metric"""
    text = c.get("/metrics").text
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf'^{name}{{class="(\w+)"}} (\S+)$', text, re.M)}


def gauge(c: httpx.Client, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", c.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_until(condition, what: str, deadline_s: float = 120) -> None:
    until(condition, what, deadline_s)


@pytest.fixture
def app_root(tiny_app, tmp_path):
    """A data root of its own with the session's test sets."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "adapters").symlink_to(tiny_app.data_root / "adapters")
    return root


def add_in_background(c: httpx.Client, collection: str, files: list[bytes]) -> tuple[threading.Thread, list]:
    reply: list[httpx.Response | Exception] = []

    def run() -> None:
        try:
            reply.append(c.post(f"/collections/{collection}/items",
                                json={"items": [{"id": f"big{i}", "image": b64(f)} for i, f in enumerate(files)]}))
        except Exception as e:  # reported by the test, not lost in the thread
            reply.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, reply


def test_a_bulk_add_far_over_the_budget_succeeds_while_vqa_gets_room_at_once(app_root):
    with running_app(app_root, backbone="blip-tiny", decode_wait_s=0, request_timeout_s=600, **SETTINGS) as server, \
            server.client(ADMIN_KEY, timeout=300) as c:
        assert c.post("/collections", json={"name": "bulk", "kind": "image", "adapter": "ret-a"}).status_code == 201
        vqa = {"image": b64(image_bytes()), "question": "what colour is it?", "adapter": "vqa-a"}
        assert c.post("/vqa", json=vqa).status_code == 200  # warm: first-use costs are not measured below
        thread, reply = add_in_background(c, "bulk", big_pngs(ITEMS))
        wait_until(lambda: samples(c, "uniadapter_decode_waiting").get("bulk", 0) >= 2 or reply,
                   "the add's decodes to queue for the budget")
        # While bulk decodes queue (they need ITEMS x the share), each /vqa decodes at once: with DECODE_WAIT_S
        # = 0 it would be 503 had it waited at all. A round counts when bulk work still queued after it.
        codes, seconds, rounds = [], [], 0
        while not reply and len(codes) < 50:
            started = time.monotonic()
            codes.append(c.post("/vqa", json=vqa).status_code)
            seconds.append(time.monotonic() - started)
            state = samples(c, "uniadapter_decode_waiting")
            held = samples(c, "uniadapter_decode_class_pixels")
            assert held["bulk"] <= PIXELS, held  # bulk work never holds more than its share
            rounds += state["bulk"] >= 1
        thread.join(600)
        r = reply[0]
        assert isinstance(r, httpx.Response) and r.status_code == 201, r
        assert r.json()["items"] == ITEMS and sorted(r.json()["ids"]) == sorted(f"big{i}" for i in range(ITEMS))
        assert codes == [200] * len(codes) and rounds >= 1, (codes, rounds)
        waited = samples(c, "uniadapter_decode_class_waits_total")
        assert waited["task"] == 0, waited  # no task decode waited for the budget
        assert waited["bulk"] >= 1  # bulk decodes did wait, longer than DECODE_WAIT_S = 0, and none gave up
        assert gauge(c, 'uniadapter_decode_budget_waits_total{outcome="timed_out"}') == 0
        assert gauge(c, "uniadapter_decode_pixels") == 0
        assert c.get("/collections/bulk").json()["items"] == ITEMS
        print(f"/vqa during the bulk add: {len(seconds)} calls, max {max(seconds) * 1000:.0f} ms")


def test_a_bulk_add_that_outlives_its_deadline_is_504_and_stores_nothing(app_root):
    # 48 decodes of 4 Mpix, one at a time, cannot finish in 0.2 s
    with running_app(app_root, backbone="blip-tiny", decode_wait_s=0, request_timeout_s=0.2, **SETTINGS) as server, \
            server.client(ADMIN_KEY, timeout=300) as c:
        assert c.post("/collections", json={"name": "late", "kind": "image", "adapter": "ret-a"}).status_code == 201
        thread, reply = add_in_background(c, "late", big_pngs(ITEMS))
        thread.join(600)
        r = reply[0]
        assert isinstance(r, httpx.Response) and r.status_code == 504, r
        assert "deadline" in r.json()["detail"]
        assert c.get("/collections/late").json()["items"] == 0
        # every decode of it gives its pixels back or leaves the queue by its deadline
        wait_until(lambda: gauge(c, "uniadapter_decode_pixels") == 0
                   and sum(samples(c, "uniadapter_decode_waiting").values()) == 0, "the budget to drain")
