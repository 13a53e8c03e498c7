"""The demo world: seeded scenes of coloured shapes and short clips of moving shapes, each with
captions and question/answer pairs. Small enough to learn on two CPU cores, rich enough to need
vision, language and their fusion: colour, shape, count, position, size, pairwise relations, direction
of motion and what changed.

Pre-training and the downstream tasks see different things, as in the paper's setting: pre-training
captions name the shapes and colours only (`Scene.pretrain_caption`), while retrieval captions
(`Scene.caption`) name sizes, sides and left/right relations, which the backbone never learnt to read or
say. Scenes come in families of `FAMILY_SIZE` consecutive indices that share their shapes and colours
and differ in layout, so a held-out gallery holds several scenes a shapes-and-colours reading cannot
tell apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "gray": (150, 150, 150),
                                                "black": (25, 25, 25)}
NUMBERS = ("zero", "one", "two", "three", "four")
DIRECTIONS = ("left", "right", "up", "down")
FAMILY_SIZE = 8
"""consecutive scene indices that share their shapes and colours (and differ in sizes, sides, backgrounds)"""


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str
    x: float
    """centre, 0..1 of the width"""
    y: float

    @property
    def horizontal(self) -> str:
        return "left" if self.x < 0.5 else "right"

    @property
    def vertical(self) -> str:
        return "top" if self.y < 0.5 else "bottom"

    def phrase(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    shapes: list[Shape]
    """in the family's order (not left to right)"""
    background: str
    family: int = 0

    def caption(self) -> str:
        """What retrieval asks for: size and side of a lone shape, the left/right relation of two."""
        if len(self.shapes) == 1:
            s = self.shapes[0]
            return f"a {s.size} {s.phrase()} on the {s.horizontal}"
        a, b = self.shapes[0], self.shapes[1]
        relation = "left of" if a.x < b.x else "right of"
        return f"a {a.phrase()} {relation} a {b.phrase()}"

    def pretrain_caption(self) -> str:
        """What pre-training reads: the shapes and colours, nothing of layout or size (the family's order
        says nothing of where each shape is)."""
        return " and ".join(f"a {s.phrase()}" for s in self.shapes)

    def questions(self) -> list[tuple[str, str]]:
        qa: list[tuple[str, str]] = [("how many shapes are there", NUMBERS[len(self.shapes)])]
        by_shape: dict[str, list[Shape]] = {}
        for s in self.shapes:
            by_shape.setdefault(s.shape, []).append(s)
        for shape, found in by_shape.items():
            if len(found) == 1:
                s = found[0]
                qa.append((f"what colour is the {shape}", s.color))
                qa.append((f"is the {shape} on the left or right", s.horizontal))
        by_color: dict[str, list[Shape]] = {}
        for s in self.shapes:
            by_color.setdefault(s.color, []).append(s)
        for color, found in by_color.items():
            if len(found) == 1:
                qa.append((f"what shape is {color}", found[0].shape))
        absent = [c for c in COLORS if c not in by_color]
        qa.append((f"is there a {self.shapes[0].color} shape", "yes"))
        if absent:
            qa.append((f"is there a {absent[0]} shape", "no"))
        return qa


@dataclass
class Clip:
    frames: list[Scene]
    event: str
    """'move' or 'change'"""
    subject: Shape
    direction: str | None = None
    new_color: str | None = None
    questions_: list[tuple[str, str]] = field(default_factory=list)

    def caption(self) -> str:
        if self.event == "move":
            return f"a {self.subject.phrase()} moves {self.direction}"
        return f"a {self.subject.shape} turns from {self.subject.color} to {self.new_color}"

    def questions(self) -> list[tuple[str, str]]:
        s = self.subject
        if self.event == "move":
            return [(f"which way does the {s.shape} move", str(self.direction)),
                    ("what colour is the moving shape", s.color),
                    ("what happens in the video", "move")]
        return [(f"what colour does the {s.shape} become", str(self.new_color)),
                (f"what colour is the {s.shape} at first", s.color),
                ("what happens in the video", "change")]


class World:
    """All randomness comes from one seed, so a data set is reproducible from (seed, index)."""

    def __init__(self, seed: int = 0, image_size: int = 96, max_shapes: int = 2) -> None:
        self.seed = seed
        self.size = image_size
        self.max_shapes = max_shapes

    def _rng(self, kind: str, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{kind}:{index}")

    def _place(self, rng: random.Random, shape: str, color: str, slot: int, slots: int) -> Shape:
        """`shape` in vertical band `slot` of `slots` (so shapes never overlap and left/right is clear)."""
        size = rng.choice(SIZES)
        r = 0.13 if size == "small" else 0.2
        lo, hi = slot / slots + r, (slot + 1) / slots - r
        x = rng.uniform(lo, hi) if lo < hi else (slot + 0.5) / slots
        y = rng.uniform(r, 1 - r)
        return Shape(shape, color, size, x, y)

    def scene(self, index: int, num_shapes: int | None = None) -> Scene:
        """Scene `index`: its family (index // FAMILY_SIZE) draws how many shapes and which shapes and colours
        (each shape and colour at most once); the index itself draws the layout, sizes and background."""
        family = index // FAMILY_SIZE
        family_rng = self._rng("family", family)
        n = num_shapes or family_rng.randint(1, self.max_shapes)
        kinds = family_rng.sample(SHAPES, n)
        colors = family_rng.sample(list(COLORS), n)
        rng = self._rng("scene", index)
        slots = list(range(n))
        rng.shuffle(slots)
        shapes = [self._place(rng, kind, color, slot, n)
                  for kind, color, slot in zip(kinds, colors, slots, strict=True)]
        return Scene(shapes, rng.choice(list(BACKGROUNDS)), family)

    def clip(self, index: int, num_frames: int = 8) -> Clip:
        rng = self._rng("clip", index)
        background = rng.choice(list(BACKGROUNDS))
        size = rng.choice(SIZES)
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        if rng.random() < 0.5:
            direction = rng.choice(DIRECTIONS)
            dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
            x0, y0 = 0.5 - 0.25 * dx + rng.uniform(-0.05, 0.05), 0.5 - 0.25 * dy + rng.uniform(-0.05, 0.05)
            frames = [Scene([Shape(shape, color, size, x0 + 0.5 * dx * t / (num_frames - 1),
                                   y0 + 0.5 * dy * t / (num_frames - 1))], background) for t in range(num_frames)]
            return Clip(frames, "move", frames[0].shapes[0], direction=direction)
        new_color = rng.choice([c for c in COLORS if c != color])
        x, y = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
        switch = rng.randint(2, num_frames - 2)
        frames = [Scene([Shape(shape, color if t < switch else new_color, size, x, y)], background)
                  for t in range(num_frames)]
        return Clip(frames, "change", frames[0].shapes[0], new_color=new_color)

    # -- rendering -------------------------------------------------------------------------------

    def render(self, scene: Scene) -> Image.Image:
        scale = 4  # draw large, then downsample: anti-aliased edges
        big = self.size * scale
        image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
        draw = ImageDraw.Draw(image)
        for s in scene.shapes:
            _draw(draw, s, big)
        return image.resize((self.size, self.size), Image.Resampling.LANCZOS)

    def render_clip(self, clip: Clip) -> list[np.ndarray]:
        return [np.asarray(self.render(frame)) for frame in clip.frames]


def _draw(draw: ImageDraw.ImageDraw, s: Shape, side: int) -> None:
    r = (0.13 if s.size == "small" else 0.2) * side
    cx, cy = s.x * side, s.y * side
    fill = COLORS[s.color]
    if s.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif s.shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif s.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    else:  # star
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
