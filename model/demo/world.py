"""The demo world: seeded scenes of coloured shapes and short clips of moving shapes, each with
captions and question/answer pairs. Small enough to learn on two CPU cores, rich enough to need
vision, language and their fusion: colour, shape, count, position, size, pairwise relations, direction
of motion and what changed. Long videos (`World.long_video`) string scenes together as timed events, for search
inside a video.

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


QUESTION_KINDS: tuple[tuple[str, str, str], ...] = (
    # (kind, how the question starts, how it ends): the forms `Scene.questions` and `Clip.questions` ask
    ("count", "how many ", ""),
    ("side", "is the ", " on the left or right"),
    ("presence", "is there a ", ""),
    ("shape", "what shape is ", ""),
    ("moving colour", "what colour is the moving shape", ""),
    ("first colour", "what colour is the ", " at first"),
    ("new colour", "what colour does the ", " become"),
    ("colour", "what colour is the ", ""),
    ("direction", "which way does the ", " move"),
    ("event", "what happens in the video", ""),
)
"""the first whose start and end a question has names its kind"""


def caption_kind(caption: str) -> str:
    """The kind of a demo retrieval caption (`Scene.caption`): "relation" (two shapes, "... left of ..."),
    "side" (a lone shape's size and side), "other" otherwise."""
    c = " ".join(caption.lower().split())
    if " left of " in c or " right of " in c:
        return "relation"
    return "side" if c.endswith((" left", " right")) else "other"


def question_kind(question: str) -> str:
    """The kind of a demo question ("count", "colour", "side", "shape", "presence"; of clips "direction",
    "moving colour", "first colour", "new colour", "event"), by the forms the world asks; "other" otherwise."""
    q = " ".join(question.lower().strip().rstrip("?").split())
    return next((kind for kind, start, end in QUESTION_KINDS if q.startswith(start) and q.endswith(end)), "other")


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

    def pretrain_caption(self, ordered: bool = False) -> str:
        """What pre-training reads: the shapes and colours, nothing of size and no word of layout. In the family's
        order, which says nothing of where each shape is; `ordered`: left to right, so the order of the words
        binds each shape to its place (still no word for a side or a relation)."""
        shapes = sorted(self.shapes, key=lambda s: s.x) if ordered else self.shapes
        return " and ".join(f"a {s.phrase()}" for s in shapes)

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


@dataclass(frozen=True)
class Event:
    """One segment of a long video: a scene whose shapes bob up and down, shown over [start_s, end_s)."""

    scene: Scene
    """the layout at the event's start (sides and sizes hold throughout: only heights move)"""
    start_s: float
    end_s: float
    bob: tuple[tuple[float, float, float], ...] = ()
    """per shape: (amplitude, period s, phase) of its vertical motion"""

    def caption(self) -> str:
        return self.scene.caption()

    def scene_at(self, t: float) -> Scene:
        """The scene at `t` seconds into the video (t in [start_s, end_s))."""
        dt = t - self.start_s
        shapes = [Shape(s.shape, s.color, s.size, s.x, s.y + a * math.sin(2 * math.pi * dt / period + phase))
                  for s, (a, period, phase) in zip(self.scene.shapes, self.bob, strict=True)]
        return Scene(shapes, self.scene.background, self.scene.family)


@dataclass(frozen=True)
class LongVideo:
    """Events back to back from 0 s; every boundary is on a frame (a multiple of 1 / fps)."""

    events: tuple[Event, ...]
    fps: int

    @property
    def duration_s(self) -> float:
        return self.events[-1].end_s

    @property
    def num_frames(self) -> int:
        return round(self.duration_s * self.fps)

    def event_at(self, t: float) -> Event:
        for event in self.events:
            if event.start_s <= t < event.end_s:
                return event
        raise ValueError(f"{t} s is outside the video (0 to {self.duration_s} s)")

    def scene_at_frame(self, k: int) -> Scene:
        """Frame k is shown from k / fps to (k + 1) / fps."""
        t = k / self.fps
        return self.event_at(t).scene_at(t)


LONG_VIDEO_S = (60.0, 120.0)
"""a long video's duration range"""
EVENT_S = (8.0, 12.0)
"""an event's length range: at least one window of 8 s (stride 4 s) overlaps it with IoU >= 0.6"""


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

    def long_video(self, index: int, fps: int = 2, duration_s: tuple[float, float] = LONG_VIDEO_S,
                   event_s: tuple[float, float] = EVENT_S) -> LongVideo:
        """Long video `index`: events of `event_s` seconds (on frame boundaries) back to back until the video
        lasts within `duration_s`. Each event is a scene of one or two shapes on its own background, drawn so
        that no two events of the video share a shape of the same colour (a caption names one event only)."""
        lo, hi = duration_s
        if not 0 < event_s[0] <= event_s[1] or hi - lo < event_s[1]:
            raise ValueError(f"cannot fill {duration_s} s with events of {event_s} s")
        rng = self._rng("long", index)
        target = rng.uniform(lo, hi - event_s[1])  # stop at the first total >= target: lands in [lo, hi)
        steps = (round(event_s[0] * fps), round(event_s[1] * fps))
        free = [(kind, color) for kind in SHAPES for color in COLORS]
        rng.shuffle(free)
        events: list[Event] = []
        start = 0  # frames
        while start / fps < target:
            length = rng.randint(*steps)
            picked = [free.pop()]
            other = [p for p in free if p[0] != picked[0][0] and p[1] != picked[0][1]]
            if other and rng.random() < 0.5:  # a second shape, of another shape and colour (as in `scene`)
                picked.append(other[-1])
                free.remove(other[-1])
            slots = list(range(len(picked)))
            rng.shuffle(slots)
            shapes = [self._place(rng, kind, color, slot, len(picked))
                      for (kind, color), slot in zip(picked, slots, strict=True)]
            bob = []
            for s in shapes:
                r = 0.13 if s.size == "small" else 0.2
                room = min(s.y - r, 1 - r - s.y)
                bob.append((min(0.12, room), rng.uniform(3.0, 6.0), rng.uniform(0, 2 * math.pi)))
            events.append(Event(Scene(shapes, rng.choice(list(BACKGROUNDS))), start / fps, (start + length) / fps,
                                tuple(bob)))
            start += length
            if not free:
                free = [(kind, color) for kind in SHAPES for color in COLORS]
                rng.shuffle(free)
        return LongVideo(tuple(events), fps)

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

    def render_long_video(self, video: LongVideo) -> list[np.ndarray]:
        """Every frame, (H, W, 3) uint8, frame k shown from k / fps."""
        return [np.asarray(self.render(video.scene_at_frame(k))) for k in range(video.num_frames)]


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
