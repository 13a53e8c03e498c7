"""Training/evaluation data: the demo world, and readers for the usual annotation formats of the real
benchmarks (COCO/Flickr Karpathy JSON, VQA v2, MSRVTT, MSRVTT-QA).

Readers validate every record and reject a malformed one with its file and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from uniadapter_serve.errors import InputError
from uniadapter_serve.model.demo.world import Clip, Scene, World


@dataclass
class ImageText:
    image: str | np.ndarray
    """a path (real data) or (H, W, 3) uint8 pixels (demo)"""
    captions: list[str]
    key: str = ""
    """identity of the scene: images with equal keys satisfy each other's captions"""


@dataclass
class QA:
    media: str | np.ndarray | list[np.ndarray]
    """image path / pixels, or a clip's frames"""
    question: str
    answers: dict[str, float] = field(default_factory=dict)
    """answer -> weight (VQA v2: count/10 per human answer; demo: 1.0)"""

    @property
    def best(self) -> str:
        return max(self.answers, key=lambda a: self.answers[a])


# -- the demo world ----------------------------------------------------------------------------------

SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


def demo_images(world: World, split: str, n: int) -> list[ImageText]:
    start = SPLIT_OFFSETS[split]
    out = []
    for i in range(start, start + n):
        scene = world.scene(i)
        out.append(ImageText(np.asarray(world.render(scene)), [scene.caption()], key=scene.caption()))
    return out


def demo_vqa(world: World, split: str, n: int) -> list[QA]:
    start = SPLIT_OFFSETS[split]
    out = []
    for i in range(start, start + n):
        scene: Scene = world.scene(i)
        pixels = np.asarray(world.render(scene))
        out += [QA(pixels, q, {a: 1.0}) for q, a in scene.questions()]
    return out


def demo_videoqa(world: World, split: str, n: int, num_frames: int = 8) -> list[QA]:
    start = SPLIT_OFFSETS[split]
    out = []
    for i in range(start, start + n):
        clip: Clip = world.clip(i, num_frames)
        frames = world.render_clip(clip)
        out += [QA(frames, q, {a: 1.0}) for q, a in clip.questions()]
    return out


# -- real formats -----------------------------------------------------------------------------------


def _records(path: Path, key: str | None = None) -> Iterator[tuple[Any, int]]:
    """(record, line) for each element of a JSON array (the file's, or `key`'s within an object)."""
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e
    array = data.get(key) if key is not None and isinstance(data, dict) else data
    if not isinstance(array, list):
        raise InputError(f"{path}: expected a JSON list{f' under {key!r}' if key else ''}")
    # find each element's line by decoding the array element by element
    start = text.index("[", text.index(f'"{key}"') if key is not None else 0) + 1
    decoder = json.JSONDecoder()
    pos = start
    for record in array:
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        yield record, text.count("\n", 0, pos) + 1
        pos = end


def _need(record: Any, keys: tuple[str, ...], path: Path, line: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"{path}:{line}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{path}:{line}: missing field(s) {missing}")
    return record


def read_karpathy(path: str | Path, image_root: str | Path, split: str | None = None) -> list[ImageText]:
    """COCO / Flickr30K Karpathy split JSON: {"images": [{"filepath", "filename", "split",
    "sentences": [{"raw": ...}]}]} -> one item per image with its captions."""
    path, root = Path(path), Path(image_root)
    out = []
    for record, line in _records(path, "images"):
        r = _need(record, ("filename", "split", "sentences"), path, line)
        if not isinstance(r["sentences"], list) or not all(isinstance(s, dict) and "raw" in s for s in r["sentences"]):
            raise InputError(f"{path}:{line}: 'sentences' must be a list of objects with 'raw'")
        if split is not None and r["split"] != split and not (split == "train" and r["split"] == "restval"):
            continue
        rel = Path(r.get("filepath", "")) / r["filename"]
        out.append(ImageText(str(root / rel), [s["raw"] for s in r["sentences"]], key=str(rel)))
    return out


def read_vqa_v2(questions: str | Path, annotations: str | Path | None, image_root: str | Path,
                image_pattern: str = "COCO_{subset}_{image_id:012d}.jpg", subset: str = "val2014") -> list[QA]:
    """VQA v2: questions {"questions": [{"image_id", "question", "question_id"}]} and annotations
    {"annotations": [{"question_id", "answers": [{"answer"}]}]} -> answers weighted count/10."""
    qpath, root = Path(questions), Path(image_root)
    answers: dict[int, dict[str, float]] = {}
    if annotations is not None:
        apath = Path(annotations)
        for record, line in _records(apath, "annotations"):
            r = _need(record, ("question_id", "answers"), apath, line)
            counts: dict[str, float] = {}
            for a in r["answers"]:
                if not isinstance(a, dict) or "answer" not in a:
                    raise InputError(f"{apath}:{line}: each answer needs an 'answer' field")
                text = normalize_answer(str(a["answer"]))
                counts[text] = counts.get(text, 0.0) + 0.1
            answers[int(r["question_id"])] = counts
    out = []
    for record, line in _records(qpath, "questions"):
        r = _need(record, ("image_id", "question", "question_id"), qpath, line)
        image = root / image_pattern.format(subset=subset, image_id=int(r["image_id"]))
        out.append(QA(str(image), str(r["question"]), answers.get(int(r["question_id"]), {})))
    return out


def read_msrvtt(path: str | Path, video_root: str | Path, split: str | None = None) -> list[ImageText]:
    """MSRVTT: {"videos": [{"video_id", "split"}], "sentences": [{"video_id", "caption"}]}."""
    path, root = Path(path), Path(video_root)
    splits: dict[str, str] = {}
    for record, line in _records(path, "videos"):
        r = _need(record, ("video_id",), path, line)
        splits[str(r["video_id"])] = str(r.get("split", "train"))
    captions: dict[str, list[str]] = {}
    for record, line in _records(path, "sentences"):
        r = _need(record, ("video_id", "caption"), path, line)
        if str(r["video_id"]) not in splits:
            raise InputError(f"{path}:{line}: caption for unknown video {r['video_id']!r}")
        captions.setdefault(str(r["video_id"]), []).append(str(r["caption"]))
    return [ImageText(str(root / f"{vid}.mp4"), caps, key=vid) for vid, caps in captions.items()
            if split is None or splits[vid] == split]


def read_msrvtt_qa(path: str | Path, video_root: str | Path) -> list[QA]:
    """MSRVTT-QA: a JSON list of {"video_id" (or "video"), "question", "answer"}."""
    path, root = Path(path), Path(video_root)
    out = []
    for record, line in _records(path):
        r = _need(record, ("question", "answer"), path, line)
        video = r.get("video_id", r.get("video"))
        if video is None:
            raise InputError(f"{path}:{line}: missing field 'video_id'")
        name = str(video)
        if not name.endswith(".mp4"):
            name = f"video{name}.mp4" if name.isdigit() else f"{name}.mp4"
        out.append(QA(str(root / name), str(r["question"]), {normalize_answer(str(r["answer"])): 1.0}))
    return out


# -- answers ------------------------------------------------------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """VQA-style normalisation: lowercase, no punctuation, no articles, number words as digits."""
    words = "".join(c if c.isalnum() or c.isspace() else " " for c in answer.lower()).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: dict[str, float]) -> float:
    """VQA v2 soft accuracy min(#humans who gave it / 3, 1) from count/10 weights; 0/1 for demo answers."""
    weight = answers.get(normalize_answer(prediction), answers.get(prediction, 0.0))
    if weight >= 1.0:
        return 1.0
    return min(round(weight * 10) / 3, 1.0)
