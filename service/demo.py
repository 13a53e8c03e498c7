"""What `uniadapter serve` with no arguments serves: the shipped demo.

With the backbone 'demo' and its trained weights present (model/demo/, built by
`python -m uniadapter_serve.adapters.demo.build`), the service

- publishes the three shipped adapter sets (demo-retrieval, demo-vqa, demo-videoqa) into the
  adapters root and uses them when a request names no set (explicit `default_*_adapter` settings
  win);
- creates three collections of held-out demo-world media, bound to the exact demo-retrieval version:
  `demo-images`, `demo-videos` and `demo-long-videos` (60-120 s videos of timed events, indexed as moments
  of 8 s every 4 s; each item's metadata lists its events). Their files are written under MEDIA_ROOT/demo/,
  so they can be opened, uploaded from Swagger, or re-indexed like any user media.

Everything is created only where missing: a restart, or a second replica on the same volume,
changes nothing, and an interrupted start finishes the collections on the next one.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import numpy as np

from uniadapter_serve.adapters.format import read_adapter_meta
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.errors import ConflictError, NotFoundError, OverloadedError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.demo.shipped import SET_NAMES
from uniadapter_serve.model.demo.world import Clip, LongVideo, Scene, World
from uniadapter_serve.model.loading import DEMO_DIR

if TYPE_CHECKING:
    from uniadapter_serve.service.collections.manager import CollectionManager
    from uniadapter_serve.service.settings import Settings

log = logging.getLogger(__name__)

SETS_DIR = DEMO_DIR.parent / "adapters"
DEMO_SETS = SET_NAMES
IMAGES, VIDEOS, LONG_VIDEOS = "demo-images", "demo-videos", "demo-long-videos"
NUM_IMAGES, NUM_VIDEOS, NUM_LONG_VIDEOS = 64, 16, 3
FIRST_INDEX = 3_000_000
"""held out: training uses indices from 0, evaluation from 2,000,000"""
FPS = 4
LONG_FPS = 2
"""long videos: 2 frames a second keep the start fast (a window of 8 s still has 16 frames to sample 8 from)"""
MOMENT_WINDOW_S, MOMENT_STRIDE_S = 8.0, 4.0
BATCH = 16


def shipped() -> bool:
    """The trained demo backbone and all three sets are in the package."""
    return (DEMO_DIR / "config.json").is_file() and all(
        (SETS_DIR / name / "v1" / "adapter_config.json").is_file() for name in DEMO_SETS.values())


def enabled(settings: Settings) -> bool:
    return settings.backbone == "demo" and settings.demo_content and shipped()


def install_sets(registry: AdapterRegistry) -> dict[str, str]:
    """Publish the shipped sets that the adapters root lacks; returns task -> set name."""
    for name in DEMO_SETS.values():
        folder = SETS_DIR / name / "v1"
        version = read_adapter_meta(folder).version
        if not any(m.version == version for m in registry.versions(name)):
            meta = registry.publish_folder(folder)
            log.info("published the shipped demo set %s", meta.ref)
    return dict(DEMO_SETS)


@dataclass
class DemoItem:
    id: str
    path: str
    """relative to the media root"""
    data: bytes
    metadata: dict[str, Any]


@cache
def _world() -> World:
    return World(seed=0)


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def mp4(frames: list[np.ndarray], fps: int = FPS) -> bytes:
    """H.264 (4:2:0, so browsers play it) at near-lossless quality: a 96 px frame has no detail to spare."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": "4", "preset": "medium"})
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _metadata(content: Scene | Clip) -> dict[str, Any]:
    """What an item shows, so search results and answers can be checked by eye."""
    qa = content.questions()
    return {"caption": content.caption(), "questions": [q for q, _ in qa], "answers": [a for _, a in qa]}


def image_items(n: int = NUM_IMAGES) -> list[DemoItem]:
    world = _world()
    scenes = [world.scene(FIRST_INDEX + i) for i in range(n)]
    return [DemoItem(item_id, f"demo/images/{item_id}.png", png(np.asarray(world.render(scene))), _metadata(scene))
            for item_id, scene in zip(_ids("scene", n), scenes, strict=True)]


def video_items(n: int = NUM_VIDEOS) -> list[DemoItem]:
    world = _world()
    clips = [world.clip(FIRST_INDEX + i) for i in range(n)]
    return [DemoItem(item_id, f"demo/videos/{item_id}.mp4", mp4(world.render_clip(clip)), _metadata(clip))
            for item_id, clip in zip(_ids("clip", n), clips, strict=True)]


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


def long_video(i: int) -> LongVideo:
    """The i-th shipped long video's events (held out like the other demo media)."""
    return _world().long_video(FIRST_INDEX + i, fps=LONG_FPS)


def long_video_items(n: int = NUM_LONG_VIDEOS, only: set[str] | None = None) -> list[DemoItem]:
    """The long videos (those of `only` when given: rendering and encoding is the cost), each item's metadata
    listing its events (caption, start_s, end_s) and naming the video (`video`: its id, to filter a search by)."""
    world = _world()
    out = []
    for i, item_id in enumerate(_ids("long", n)):
        if only is not None and item_id not in only:
            continue
        video = long_video(i)
        events = [{"caption": e.caption(), "start_s": e.start_s, "end_s": e.end_s} for e in video.events]
        out.append(DemoItem(item_id, f"demo/long-videos/{item_id}.mp4",
                            mp4(world.render_long_video(video), fps=LONG_FPS),
                            {"caption": "; ".join(e.caption() for e in video.events), "video": item_id,
                             "duration_s": video.duration_s, "events": events}))
    return out


@cache
def example_scene() -> Scene:
    """The first held-out scene with a single circle: Swagger's example image for /vqa."""
    world = _world()
    return next(scene for scene in map(world.scene, range(FIRST_INDEX, FIRST_INDEX + 1000))
                if [s.shape for s in scene.shapes] == ["circle"])


@cache
def example_clip() -> Clip:
    """The first held-out clip of a square changing colour: Swagger's example video for /videoqa (the demo set
    reads colours before and after; direction of motion is its weak spot, see README)."""
    world = _world()
    return next(clip for clip in map(world.clip, range(FIRST_INDEX, FIRST_INDEX + 1000))
                if clip.event == "change" and clip.subject.shape == "square")


@cache
def example_image() -> str:
    return base64.b64encode(png(np.asarray(_world().render(example_scene())))).decode()


@cache
def example_video() -> str:
    return base64.b64encode(mp4(_world().render_clip(example_clip()))).decode()


def request_examples() -> dict[str, dict[str, Any]]:
    """Ready-to-run JSON bodies for Swagger's "Try it out" (they answer with the demo model)."""
    return {
        "vqa": {"image": example_image(), "question": "what colour is the circle?", "mode": "rank", "top_k": 3},
        "videoqa": {"video": example_video(), "question": "what colour does the square become?", "top_k": 3},
        "retrieve": {"query_text": "a large purple circle on the right", "collection": IMAGES, "top_k": 5,
                     "rerank_k": 0},
    }


async def ensure_collections(collections: CollectionManager, registry: AdapterRegistry, media_dir: Path) -> None:
    """Create demo-images / demo-videos / demo-long-videos (and their media files) where missing, bound to the
    shipped demo-retrieval version even if a newer one was published."""
    from uniadapter_serve.service.collections.ingest import IncomingItem  # the manager imports the schemas
    from uniadapter_serve.service.collections.store import MomentSpec

    retrieval = DEMO_SETS["retrieval"]
    ref = registry.resolve(f"{retrieval}@{read_adapter_meta(SETS_DIR / retrieval / 'v1').version}").ref
    made: list[tuple[str, str, MomentSpec | None, list[str], Callable[[set[str]], list[DemoItem]]]] = [
        (IMAGES, "image", None, _ids("scene", NUM_IMAGES), lambda ids: image_items()),
        (VIDEOS, "video", None, _ids("clip", NUM_VIDEOS), lambda ids: video_items()),
        (LONG_VIDEOS, "video", MomentSpec(MOMENT_WINDOW_S, MOMENT_STRIDE_S), _ids("long", NUM_LONG_VIDEOS),
         lambda ids: long_video_items(only=ids))]  # make(missing ids): long videos are rendered only when missing
    for name, kind, moments, ids, make in made:
        try:
            collection = collections.get(name)
        except NotFoundError:
            try:
                collection = collections.create(name, kind, ref, moments=moments)
                log.info("creating the demo collection %s (%s)", name, ref)
            except ConflictError:  # another replica created it a moment ago
                collection = collections.get(name)
        present = collection.store.existing(ids)
        todo = [it for it in make({i for i in ids if i not in present}) if it.id not in present]
        for it in todo:
            _write_media(media_dir / it.path, it.data)
        start = 0
        while start < len(todo):
            chunk = todo[start:start + BATCH]
            try:
                await collections.add(name, [IncomingItem(id=it.id, path=it.path, metadata=it.metadata)
                                                  for it in chunk])
            except ConflictError:  # another replica added some of them meanwhile
                pass
            except OverloadedError as e:  # traffic already: admitted whole once the queue has room
                await asyncio.sleep(e.retry_after)
                continue
            start += BATCH


def _write_media(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
