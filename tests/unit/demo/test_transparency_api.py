"""Through the HTTP API (in-process, the shipped demo model): a transparent PNG is scored as the same picture
composited onto white, as transformers' BLIP processor sees it, not as the colours under its transparency."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from uniadapter_serve.model.demo.world import Scene, Shape, World

CAPTION = "a large red square on the left"


def b64_png(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def client(demo_app):
    with demo_app.client() as c:
        yield c


def transparent_scene() -> tuple[Image.Image, Image.Image, Image.Image]:
    """-> (RGBA, the same composited onto white, its colour layer alone). The scene's white background is fully
    transparent over a blue layer; the square is half transparent (alpha 128) over its own red."""
    scene = np.asarray(World(seed=0).render(Scene([Shape("square", "red", "large", 0.3, 0.5)], "white")).convert("RGB"))
    background = (scene > 240).all(axis=-1)
    rgba = np.empty((*scene.shape[:2], 4), np.uint8)
    rgba[..., :3] = np.where(background[..., None], np.array([30, 60, 220], np.uint8), scene)
    rgba[..., 3] = np.where(background, 0, 128)
    image = Image.fromarray(rgba, "RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return image, Image.alpha_composite(white, image).convert("RGB"), Image.fromarray(rgba[..., :3], "RGB")


def test_a_transparent_png_scores_as_composited_on_white(client):
    rgba, composited, colours = transparent_scene()
    r = client.post("/retrieve", json={"query_text": CAPTION, "top_k": 3, "rerank_k": 3,
                                       "candidate_images": [b64_png(rgba), b64_png(composited), b64_png(colours)]})
    assert r.status_code == 200, r.text
    hits = {h["id"]: h for h in r.json()["results"]}
    assert hits["0"]["itc_score"] == pytest.approx(hits["1"]["itc_score"], abs=1e-6)
    assert hits["0"]["itm_score"] == pytest.approx(hits["1"]["itm_score"], abs=1e-6)
    # what was served before: the colours under the transparency, a different picture with other scores
    assert abs(hits["0"]["itc_score"] - hits["2"]["itc_score"]) > 0.01
