"""Names of what the demo build ships under model/demo/ (the build itself is `adapters/demo/build.py`)."""

from __future__ import annotations

from pathlib import Path

from uniadapter_serve.model.demo.world import COLORS, DIRECTIONS, NUMBERS, SHAPES

DEMO_ROOT = Path(__file__).parent
"""backbone/, adapters/<set>/v1/, results.json"""
ANSWERS = sorted({*COLORS, *SHAPES, *NUMBERS[1:4], "left", "right", *DIRECTIONS, "yes", "no", "move", "change"})
"""the demo world's answer list"""
SET_NAMES = {"retrieval": "demo-retrieval", "vqa": "demo-vqa", "videoqa": "demo-videoqa"}
"""task -> the shipped set's name"""
