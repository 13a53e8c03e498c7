"""What a route asks of the engine: one typed job per task, built once by the route and passed whole through
`Engine.run` (in this process, or pickled to a Ray model replica, which forwards it as it is).

Every job carries the set that serves it (exact `name@version`, None for the bare backbone) and the request's
one `Deadline`, fixed at admission: each step of a request (decode, embed, re-rank, every queue) spends from
the same deadline, so a request ends when its deadline passes however many steps it takes.

This module holds only shared types: it imports nothing from the service beyond errors, so routes, engines
and the model thread can all depend on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.errors import ConflictError
from uniadapter_serve.model.stages import VisionInput

R = TypeVar("R")

TASK_KINDS: dict[str, tuple[str, ...]] = {
    "retrieval": ("retrieval",), "vqa": ("vqa", "videoqa"), "videoqa": ("videoqa", "vqa")}
"""The adapter-set tasks each route accepts (a VQA set answers about clips too, and a VideoQA set about images)."""


class Deadline:
    """An absolute deadline on this host's monotonic clock. Pickled (to a Ray replica on another host), it
    travels as the seconds left and is fixed again on arrival against that host's clock."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        """Seconds left (0 once it has passed)."""
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def __reduce__(self) -> tuple[object, tuple[float]]:
        return Deadline.after, (self.at - time.monotonic(),)

    def __repr__(self) -> str:
        return f"Deadline(in {self.at - time.monotonic():.3f} s)"


def frames_for(meta: AdapterSetMeta | None, asked: int | None, default: int) -> int:
    """Frames sampled from a clip served by `meta`: the ones asked for, else the set's own count (the server's
    default for the bare backbone). A set with a temporal embedding takes exactly the count it was trained on."""
    frames = asked or (meta.config.num_frames if meta is not None else default)
    if meta is not None and meta.config.temporal_embedding and frames != meta.config.num_frames:
        raise ConflictError(f"num_frames: adapter set {meta.ref} has a temporal embedding for "
                            f"{meta.config.num_frames} frames, got {frames}")
    return frames


@dataclass
class Ranking:
    """Candidates scored against one query: ITC for all, ITM for the top `rerank_k` by ITC."""

    itc: list[float]
    itm: dict[int, float] = field(default_factory=dict)


@dataclass
class Answer:
    text: str
    score: float
    """log-likelihood, or BLIP's rank score (rank mode with rank_score = "blip")"""


@dataclass(kw_only=True)
class Task(Generic[R]):
    """A job for the engine; `R` is what running it returns."""

    ref: str | None
    """the exact set (`name@version`), or None for the bare backbone"""
    deadline: Deadline


@dataclass(kw_only=True)
class AnswerJob(Task[list[Answer]]):
    """VQA / VideoQA: answers best first. Rank mode scores the set's answer list (log-likelihoods, or BLIP's rank
    score); generate mode decodes greedily (num_beams = 1) or by beam search, the other beams as alternatives."""

    visual: VisionInput
    question: str
    mode: Literal["rank", "generate"] = "rank"
    top_k: int = 1
    max_length: int = 10
    num_beams: int = 1
    rank_score: Literal["likelihood", "blip"] = "likelihood"


@dataclass(kw_only=True)
class EmbedJob(Task[torch.Tensor]):
    """The (E,) float32 L2-normalised ITC embedding of a text or of an image / clip, on the host."""

    query: str | VisionInput


@dataclass(kw_only=True)
class RankJob(Task[Ranking]):
    """A text against images / clips, or an image / clip against texts: ITC for every candidate, ITM for the
    best `rerank_k` by ITC."""

    query: str | VisionInput
    candidates: Sequence[str] | Sequence[VisionInput]
    rerank_k: int = 0


@dataclass(kw_only=True)
class MatchJob(Task[list[float]]):
    """ITM match probability of the query with each candidate (a text with images / clips, or the reverse)."""

    query: str | VisionInput
    candidates: Sequence[str] | Sequence[VisionInput]
