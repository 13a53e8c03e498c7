"""Training/evaluation data: the demo world, and readers for the usual annotation formats of the real
benchmarks (COCO/Flickr Karpathy JSON, VQA v2, MSRVTT in its release, 1k-A and list forms, MSRVTT-QA),
and the official VQA v2 accuracy.

Readers validate every record and reject a malformed one with its file and line number. They run in time
linear in the file: each JSON element is decoded once, and line numbers are counted forward from the
previous element, never from the start of the file.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from collections.abc import Generator, Iterator, Sequence
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
    group: str = ""
    """items of one group are each other's hard negatives (demo: a family of scenes with the same shapes and
    colours); training draws them into the same batch (`_sample`)"""
    layout: tuple[tuple[float, float], ...] = ()
    """demo: the shapes' centres (x, y in 0..1 of the image), left to right, for pre-training's layout objective
    (never in a caption); () for real data"""
    regions: tuple[tuple[str, float, float], ...] = ()
    """demo: each shape's phrase ("red circle") and centre (x, y), for pre-training's grounding objective; () for
    real data"""


@dataclass
class QA:
    media: str | np.ndarray | list[np.ndarray]
    """image path / pixels, or a clip's frames"""
    question: str
    answers: dict[str, float] = field(default_factory=dict)
    """normalised answer -> weight (VQA v2: count / number of human answers; demo, MSRVTT-QA: 1.0)"""
    humans: int = 0
    """how many human answers `answers` was counted from (VQA v2: 10); 0 for a single reference answer"""

    @property
    def best(self) -> str:
        return max(self.answers, key=lambda a: self.answers[a])

    def accuracy(self, prediction: str) -> float:
        """The official VQA v2 accuracy when the answers come from humans (`humans` > 0), else exact
        match; both after `normalize_answer`."""
        guess = normalize_answer(prediction)
        weight = sum(w for a, w in self.answers.items() if a == guess or normalize_answer(a) == guess)
        if self.humans <= 0:
            return 1.0 if weight > 0 else 0.0
        return leave_one_out_accuracy(round(weight * self.humans), self.humans)


# -- the demo world ----------------------------------------------------------------------------------

SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


def demo_images(world: World, split: str, n: int, *, pretraining: bool = False, ordered: bool = False
                ) -> list[ImageText]:
    """Scenes with their retrieval captions (size, side, relation), or with the pre-training captions
    (shapes and colours only; `ordered`: named left to right); grouped by family."""
    start = SPLIT_OFFSETS[split]
    out = []
    for i in range(start, start + n):
        scene = world.scene(i)
        caption = scene.pretrain_caption(ordered) if pretraining else scene.caption()
        layout = tuple(sorted((sh.x, sh.y) for sh in scene.shapes))
        regions = tuple((sh.phrase(), sh.x, sh.y) for sh in scene.shapes)
        out.append(ImageText(np.asarray(world.render(scene)), [caption], key=caption, group=f"family-{scene.family}",
                             layout=layout, regions=regions))
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


# -- reading annotation files in linear time ---------------------------------------------------------

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")
Records = Iterator[tuple[Any, int]]
"""(record, line of the file where it starts)"""
_Walk = Generator[tuple[Any, int], None, int]
"""yields (record, line); returns the offset after what it walked"""


class _Lines:
    """Line numbers of increasing offsets into a text, each counted on from the previous one."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the file: {e}") from e


def _skip(text: str, pos: int) -> int:
    match = _SPACE.match(text, pos)
    return match.end() if match else pos


def _array(text: str, pos: int, lines: _Lines) -> _Walk:
    """The elements of the JSON array whose '[' is at `pos`, each decoded once."""
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return pos + 1
    while True:
        value, end = _DECODER.raw_decode(text, pos)
        yield value, lines.at(pos)
        pos = _skip(text, end)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif text.startswith("]", pos):
            return pos + 1
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


def _member(text: str, pos: int, key: str, lines: _Lines, path: Path) -> _Walk:
    """The elements of the array under `key` in the JSON object whose '{' is at `pos`; the other members
    are decoded (so the whole file is checked) and skipped."""
    found = False
    pos = _skip(text, pos + 1)
    closed = text.startswith("}", pos)
    while not closed:
        if not text.startswith('"', pos):
            raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
        name, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _skip(text, pos + 1)
        if name == key and not found:
            if not text.startswith("[", pos):
                raise InputError(f"{path}:{lines.at(pos)}: expected a JSON list under {key!r}")
            found = True
            pos = yield from _array(text, pos, lines)
        else:
            pos = _DECODER.raw_decode(text, pos)[1]
        pos = _skip(text, pos)
        if text.startswith(",", pos):
            pos = _skip(text, pos + 1)
        elif text.startswith("}", pos):
            closed = True
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
    if not found:
        raise InputError(f"{path}: expected a JSON list under {key!r}")
    return pos + 1


def _json_records(text: str, path: Path, key: str | None = None) -> Records:
    """(record, line) for each element of the file's JSON array, or of the array under `key` when the file
    is an object."""
    lines = _Lines(text)
    try:
        pos = _skip(text, 0)
        if text.startswith("[", pos):
            end = yield from _array(text, pos, lines)
        elif key is not None and text.startswith("{", pos):
            end = yield from _member(text, pos, key, lines, path)
        else:
            _DECODER.raw_decode(text, pos)  # report malformed JSON as such
            raise InputError(f"{path}: expected a JSON list{f' under {key!r}' if key else ''}")
        end = _skip(text, end)
        if end != len(text):
            raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e


def _jsonl_records(text: str, path: Path) -> Records:
    """(record, line) for each non-blank line of a JSON-lines file."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                yield json.loads(line), number
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}:{e.colno}: malformed JSON: {e.msg}") from e


def _csv_records(path: Path, required: tuple[str, ...]) -> Records:
    """(row as a dict, line) for each row of a CSV file with a header naming at least `required`."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(f"{path}:1: the header lacks column(s) {missing} (it has {reader.fieldnames})")
            for row in reader:
                if any(row.get(c) is None for c in required):
                    raise InputError(f"{path}:{reader.line_num}: the row has fewer fields than the header")
                yield row, reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read the CSV: {e}") from e


def _list_records(path: Path) -> Records:
    """A JSON array of records, or JSON lines (`.jsonl`, or an object per line under any name)."""
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl" or _looks_like_jsonl(text):
        return _jsonl_records(text, path)
    return _json_records(text, path)


def _looks_like_jsonl(text: str) -> bool:
    """The first line alone is a JSON object and more follows it."""
    start = _skip(text, 0)
    end = text.find("\n", start)
    if not text.startswith("{", start) or end < 0 or _skip(text, end) == len(text):
        return False
    try:
        return isinstance(json.loads(text[start:end]), dict)
    except json.JSONDecodeError:
        return False


def _need(record: Any, keys: tuple[str, ...], path: Path, line: int) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise InputError(f"{path}:{line}: expected an object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"{path}:{line}: missing field(s) {missing}")
    return record


# -- real formats -----------------------------------------------------------------------------------


def read_karpathy(path: str | Path, image_root: str | Path, split: str | None = None) -> list[ImageText]:
    """COCO / Flickr30K Karpathy split JSON: {"images": [{"filepath", "filename", "split",
    "sentences": [{"raw": ...}]}]} -> one item per image with all its captions (5 for COCO and Flickr)."""
    path, root = Path(path), str(Path(image_root))
    out = []
    for record, line in _json_records(_read_text(path), path, "images"):
        r = _need(record, ("filename", "split", "sentences"), path, line)
        if not isinstance(r["sentences"], list) or not all(isinstance(s, dict) and "raw" in s for s in r["sentences"]):
            raise InputError(f"{path}:{line}: 'sentences' must be a list of objects with 'raw'")
        if split is not None and r["split"] != split and not (split == "train" and r["split"] == "restval"):
            continue
        rel = os.path.join(str(r.get("filepath", "")), str(r["filename"]))
        out.append(ImageText(os.path.join(root, rel), [s["raw"] for s in r["sentences"]], key=rel))
    return out


def read_vqa_v2(questions: str | Path, annotations: str | Path | None, image_root: str | Path,
                image_pattern: str = "COCO_{subset}_{image_id:012d}.jpg", subset: str = "val2014") -> list[QA]:
    """VQA v2: questions {"questions": [{"image_id", "question", "question_id"}]} and annotations
    {"annotations": [{"question_id", "answers": [{"answer"}]}]} -> normalised answers weighted
    count/len(answers), with `humans` = len(answers) (10 in VQA v2) for the official accuracy."""
    qpath, root = Path(questions), str(Path(image_root))
    answers: dict[int, tuple[dict[str, float], int]] = {}
    normal = functools.lru_cache(maxsize=None)(normalize_answer)  # answers repeat: each spelling once
    if annotations is not None:
        apath = Path(annotations)
        for record, line in _json_records(_read_text(apath), apath, "annotations"):
            r = _need(record, ("question_id", "answers"), apath, line)
            if not isinstance(r["answers"], list) or not r["answers"]:
                raise InputError(f"{apath}:{line}: 'answers' must be a non-empty list")
            counts: dict[str, float] = {}
            for a in r["answers"]:
                if not isinstance(a, dict) or "answer" not in a:
                    raise InputError(f"{apath}:{line}: each answer needs an 'answer' field")
                text = normal(str(a["answer"]))
                counts[text] = counts.get(text, 0.0) + 1.0
            humans = len(r["answers"])
            answers[_int(r["question_id"], "question_id", apath, line)] = (
                {a: c / humans for a, c in counts.items()}, humans)
    out = []
    for record, line in _json_records(_read_text(qpath), qpath, "questions"):
        r = _need(record, ("image_id", "question", "question_id"), qpath, line)
        image = os.path.join(root, image_pattern.format(subset=subset,
                                                        image_id=_int(r["image_id"], "image_id", qpath, line)))
        weights, humans = answers.get(_int(r["question_id"], "question_id", qpath, line), ({}, 0))
        out.append(QA(image, str(r["question"]), weights, humans))
    return out


def _int(value: Any, name: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}:{line}: {name!r} must be an integer, got {value!r}") from None


VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mkv", ".mov")


def _video_file(name: str) -> tuple[str, str]:
    """(key, file name) of an MSRVTT video named as the annotations name it: 'video7020' (BLIP's
    clip_name, the release's video_id), 'video7020.mp4' (LAVIS) or 7020 (MSRVTT-QA)."""
    name = name.strip()
    if name.isdigit():
        name = f"video{name}"
    if name.lower().endswith(VIDEO_SUFFIXES):
        return name.rsplit(".", 1)[0], name
    return name, f"{name}.mp4"


_CLIP_FIELDS = ("clip_name", "video", "video_id")
_CAPTION_FIELDS = ("caption", "sentence")
_RELEASE_SPLITS = {"val": "validate"}


def read_msrvtt(path: str | Path, video_root: str | Path, split: str | None = None,
                video_list: str | Path | None = None) -> list[ImageText]:
    """MSRVTT captions -> one item per video with all its captions, from any of:

    - the release file (MSRVTT_data.json, train_val_videodatainfo.json): {"videos": [{"video_id", "split"}],
      "sentences": [{"video_id", "caption"}]}; `split` picks the release's own split (train 6513 /
      validate 497 / test 2990);
    - JSON lines as BLIP's 1k-A test file msrvtt_test.jsonl: {"clip_name": "video7020", "caption": ...};
    - a JSON list of {"video": "video7020.mp4", "caption": ...} (LAVIS's msrvtt_ret_*.json), where the
      video may also be named by "clip_name" or "video_id" and the caption be a list;
    - CSV with `video_id` and `sentence` columns (MSRVTT_JSFUSION_test.csv, the 1k-A test).

    The files other than the release hold one split each: `split` does not filter them. `video_list`, the
    1k-A train lists (9k: MSRVTT_train.9k.csv or train_list_jsfusion.txt; 7k: MSRVTT_train.7k.csv),
    keeps those videos only, in place of `split`."""
    path, root = Path(path), str(Path(video_root))
    if path.suffix.lower() == ".csv":
        clips = _clips(_csv_records(path, ("video_id", "sentence")), path)
    else:
        text = _read_text(path)
        if path.suffix.lower() == ".jsonl" or _looks_like_jsonl(text):
            clips = _clips(_jsonl_records(text, path), path)
        elif text.lstrip().startswith("["):
            clips = _clips(_json_records(text, path), path)
        else:
            clips, splits = _release(text, path)
            if split is not None and video_list is None:
                wanted = _RELEASE_SPLITS.get(split, split)
                clips = {k: v for k, v in clips.items() if splits[k] == wanted}
    if video_list is not None:
        clips = _keep_listed(clips, Path(video_list), path)
    return [ImageText(os.path.join(root, name), captions, key=key) for key, (name, captions) in clips.items()]


def _clips(records: Records, path: Path) -> dict[str, tuple[str, list[str]]]:
    """key -> (file name, captions) from caption records, one or more per video."""
    clips: dict[str, tuple[str, list[str]]] = {}
    for record, line in records:
        if not isinstance(record, dict):
            raise InputError(f"{path}:{line}: expected an object, got {type(record).__name__}")
        video_field = next((f for f in _CLIP_FIELDS if f in record), None)
        caption_field = next((f for f in _CAPTION_FIELDS if f in record), None)
        if video_field is None or caption_field is None:
            raise InputError(f"{path}:{line}: a caption record needs the video ('clip_name', 'video' or "
                             f"'video_id') and its 'caption' (or 'sentence'); it has {sorted(record)}")
        video, caption = record[video_field], record[caption_field]
        if isinstance(video, bool) or not isinstance(video, str | int) or not str(video).strip():
            raise InputError(f"{path}:{line}: the video must be a name or a number, got {video!r}")
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(captions, list) or not captions or not all(
                isinstance(c, str) and c.strip() for c in captions):
            raise InputError(f"{path}:{line}: the caption must be a non-empty string or a non-empty list of them")
        key, name = _video_file(str(video))
        clips.setdefault(key, (name, []))[1].extend(captions)
    return clips


def _release(text: str, path: Path) -> tuple[dict[str, tuple[str, list[str]]], dict[str, str]]:
    """The release format: (key -> (file name, captions), key -> its split)."""
    splits: dict[str, str] = {}
    for record, line in _json_records(text, path, "videos"):
        r = _need(record, ("video_id",), path, line)
        splits[_video_file(str(r["video_id"]))[0]] = str(r.get("split", "train"))
    clips: dict[str, tuple[str, list[str]]] = {}
    for record, line in _json_records(text, path, "sentences"):
        r = _need(record, ("video_id", "caption"), path, line)
        key, name = _video_file(str(r["video_id"]))
        if key not in splits:
            raise InputError(f"{path}:{line}: caption for unknown video {r['video_id']!r}")
        clips.setdefault(key, (name, []))[1].append(str(r["caption"]))
    return clips, splits


def read_video_list(path: str | Path) -> list[tuple[str, int]]:
    """An MSRVTT split list -> (video key, line): CSV with a `video_id` column (MSRVTT_train.9k.csv,
    MSRVTT_train.7k.csv) or one video per line (train_list_jsfusion.txt)."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        rows = [(str(row["video_id"]).strip(), line) for row, line in _csv_records(path, ("video_id",))]
    else:
        rows = [(text.strip(), number) for number, text in enumerate(_read_text(path).split("\n"), 1)]
    out = []
    for name, line in rows:
        if not name:
            if path.suffix.lower() == ".csv":
                raise InputError(f"{path}:{line}: empty video_id")
            continue
        if len(name.split()) != 1:
            raise InputError(f"{path}:{line}: expected one video per line, got {name!r}")
        out.append((_video_file(name)[0], line))
    return out


def _keep_listed(clips: dict[str, tuple[str, list[str]]], listed: Path,
                 annotations: Path) -> dict[str, tuple[str, list[str]]]:
    out = {}
    for key, line in read_video_list(listed):
        if key not in clips:
            raise InputError(f"{listed}:{line}: video {key!r} has no captions in {annotations}")
        out[key] = clips[key]
    return out


def read_msrvtt_qa(path: str | Path, video_root: str | Path) -> list[QA]:
    """MSRVTT-QA: a JSON list (or JSON lines) of {"video_id" (or "video"), "question", "answer"}; scored
    by exact match after `normalize_answer`."""
    path, root = Path(path), str(Path(video_root))
    normal = functools.lru_cache(maxsize=None)(normalize_answer)
    out = []
    for record, line in _list_records(path):
        r = _need(record, ("question", "answer"), path, line)
        video = r.get("video_id", r.get("video"))
        if video is None:
            raise InputError(f"{path}:{line}: missing field 'video_id'")
        out.append(QA(os.path.join(root, _video_file(str(video))[1]), str(r["question"]),
                      {normal(str(r["answer"])): 1.0}))
    return out


# -- answers: the official VQA v2 normalisation and accuracy ------------------------------------------

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
"""what the VQA evaluation treats as punctuation (the apostrophe and the colon are kept, the period is
handled on its own)"""
_DIGIT_COMMA = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")
_CONTRACTIONS = {w.replace("'", ""): w for w in (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't", "hadn't",
    "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's", "i'd've", "i'm",
    "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't", "mightn't've", "might've",
    "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't", "shan't", "she'd", "she'd've", "she's",
    "should've", "shouldn't", "shouldn't've", "somebody'd", "somebody'll", "somebody's", "someone'd",
    "someone'll", "someone's", "something'd", "something'll", "that's", "there'd", "there're", "there's",
    "they'd", "they'll", "they're", "they've", "wasn't", "we'd", "we've", "weren't", "what'll", "what're",
    "what's", "what've", "when's", "where'd", "where's", "where've", "who'd", "who'll", "who's", "who've",
    "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "you'd", "you'll",
    "you're", "you've")}
"""a contraction written without its apostrophe -> the contraction"""


def normalize_answer(answer: str) -> str:
    """The VQA evaluation's answer processing, applied to predictions and human answers alike:

    - punctuation: a mark next to a space, or any mark when the answer has a comma between digits
      ('100,978' -> '100978'), is deleted; otherwise it becomes a space ('black-and-white' ->
      'black and white'); apostrophes and colons stay ("girl's", '2:50');
    - periods go, except before a digit (decimals: '2.5');
    - lowercase; number words to digits ('two' -> '2', 'none' -> '0'); articles (a, an, the) removed;
    - contractions missing their apostrophe get it back ('dont' -> "don't").
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    strip = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if mark in text:
            out = out.replace(mark, "" if strip or f"{mark} " in text or f" {mark}" in text else " ")
    words = []
    for word in _PERIOD.sub("", out).lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def leave_one_out_accuracy(matches: int, humans: int) -> float:
    """VQA v2 accuracy of an answer that `matches` of `humans` human answers agree with: the mean, over
    the `humans` subsets that leave one human out, of min(#agreeing humans in the subset / 3, 1).
    With 10 humans: 1, 2, 3, >=4 agreeing -> 0.3, 0.6, 0.9, 1.0."""
    if humans <= 0:
        raise ValueError(f"humans must be positive, got {humans}")
    matches = max(0, min(matches, humans))
    # the `matches` subsets that drop an agreeing human keep matches - 1; the others keep all `matches`
    return (matches * min((matches - 1) / 3, 1.0) + (humans - matches) * min(matches / 3, 1.0)) / humans


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official VQA v2 accuracy of `prediction` against the human answers to one question (10 in
    VQA v2), both normalised by `normalize_answer`.

    One deliberate difference from the official script: it skips the normalisation when all humans gave
    the same string; here both sides are always normalised, so a prediction differing from a unanimous
    answer in form only ('Two' for '2') scores 1 here and 0 there."""
    if isinstance(human_answers, str | dict):
        raise TypeError("human_answers: the list of human answers (for a QA's counted answers, use QA.accuracy)")
    if not human_answers:
        raise ValueError("no human answers")
    guess = normalize_answer(prediction)
    return leave_one_out_accuracy(sum(normalize_answer(a) == guess for a in human_answers), len(human_answers))
