"""Annotation readers at scale: synthetic files of the real formats, written to a temp dir, timed as they are
read (best of `--repeats`). Prints records/s at each size and, side by side, the time at the largest size over
the time at the smallest: about the size ratio (10 for 20k -> 200k) when reading is linear in the file.

A reader that counted lines from the start of the file for every record would scan the file once per record
and show a ratio near the square of the size ratio (about 100). Expect a little above the size ratio even
when linear: the larger files' objects no longer fit the CPU caches. JSON files are pretty-printed, so that
records sit on many lines. Records: Karpathy images (5 captions each), VQA v2 questions (one annotation of
10 answers each), MSRVTT release sentences (20 per video), 1k-A JSON lines, MSRVTT-QA questions.

    .venv/bin/python bench/datasets_read.py                          # 20k and 200k records
    .venv/bin/python bench/datasets_read.py --sizes 5000 50000 --formats vqa2
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from uniadapter_serve.adapters.datasets import (
    read_karpathy,
    read_msrvtt,
    read_msrvtt_qa,
    read_vqa_v2,
)

WORDS = ("a", "man", "riding", "horse", "on", "the", "beach", "next", "to", "two", "dogs", "and", "red", "kite",
         "flying", "over", "water", "while", "people", "watch", "from", "wooden", "pier", "in", "evening", "sun")
ANSWERS = ("yes", "no", "2", "two", "red", "black and white", "the dog", "tennis", "3", "none")


def sentence(rng: random.Random, n: int = 10) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_karpathy(folder: Path, n: int, rng: random.Random) -> Callable[[], int]:
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{i:012d}.jpg", "imgid": i,
               "split": rng.choice(("train", "restval", "val", "test")),
               "sentences": [{"raw": sentence(rng), "sentid": 5 * i + j} for j in range(5)]} for i in range(n)]
    path = folder / f"karpathy_{n}.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}, indent=1))
    return lambda: len(read_karpathy(path, "/coco"))


def write_vqa2(folder: Path, n: int, rng: random.Random) -> Callable[[], int]:
    questions = [{"image_id": i // 5, "question": sentence(rng, 6)[:-1] + "?", "question_id": i} for i in range(n)]
    annotations = [{"question_id": i, "image_id": i // 5, "answer_type": "other",
                    "answers": [{"answer": rng.choice(ANSWERS), "answer_id": j + 1} for j in range(10)]}
                   for i in range(n)]
    q, a = folder / f"vqa_q_{n}.json", folder / f"vqa_a_{n}.json"
    q.write_text(json.dumps({"questions": questions, "data_subtype": "val2014"}, indent=1))
    a.write_text(json.dumps({"annotations": annotations, "data_subtype": "val2014"}, indent=1))
    return lambda: len(read_vqa_v2(q, a, "/coco/val2014"))


def write_msrvtt_release(folder: Path, n: int, rng: random.Random) -> Callable[[], int]:
    videos = max(1, n // 20)
    data = {"info": {"year": "2016"},
            "videos": [{"id": v, "video_id": f"video{v}", "category": v % 20,
                        "split": "train" if v < 0.65 * videos else "test"} for v in range(videos)],
            "sentences": [{"sen_id": i, "video_id": f"video{i % videos}", "caption": sentence(rng)} for i in range(n)]}
    path = folder / f"msrvtt_{n}.json"
    path.write_text(json.dumps(data, indent=1))
    return lambda: sum(len(it.captions) for it in read_msrvtt(path, "/videos"))


def write_msrvtt_jsonl(folder: Path, n: int, rng: random.Random) -> Callable[[], int]:
    path = folder / f"msrvtt_{n}.jsonl"
    path.write_text("".join(json.dumps({"clip_name": f"video{i}", "caption": sentence(rng)}) + "\n"
                            for i in range(n)))
    return lambda: len(read_msrvtt(path, "/videos"))


def write_msrvtt_qa(folder: Path, n: int, rng: random.Random) -> Callable[[], int]:
    path = folder / f"msrvtt_qa_{n}.json"
    path.write_text(json.dumps([{"id": i, "video_id": 7010 + i % 2990, "question": sentence(rng, 6)[:-1] + "?",
                                 "answer": rng.choice(ANSWERS)} for i in range(n)], indent=1))
    return lambda: len(read_msrvtt_qa(path, "/videos"))


FORMATS: dict[str, Callable[[Path, int, random.Random], Callable[[], int]]] = {
    "karpathy": write_karpathy, "vqa2": write_vqa2, "msrvtt": write_msrvtt_release,
    "msrvtt-jsonl": write_msrvtt_jsonl, "msrvtt-qa": write_msrvtt_qa}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000], help="records per file")
    parser.add_argument("--formats", nargs="+", choices=sorted(FORMATS), default=list(FORMATS))
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each size is read once per round")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    results: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.formats:
            readers = {n: FORMATS[name](Path(tmp), n, random.Random(n)) for n in sizes}
            times: dict[int, list[float]] = {n: [] for n in sizes}
            counts: dict[int, int] = {}
            for r in range(args.repeats):  # sizes interleaved, order rotated: drift falls on all alike
                for i in range(len(sizes)):
                    n = sizes[(i + r) % len(sizes)]
                    gc.collect()
                    started = time.perf_counter()
                    counts[n] = readers[n]()
                    times[n].append(time.perf_counter() - started)
            results[name] = {n: min(times[n]) for n in sizes}
            for n in sizes:
                print(f"{name:13s} {n:>8,d} records  {results[name][n]:7.3f} s  {n / results[name][n]:>10,.0f} "
                      f"records/s  ({counts[n]:,d} read; best of {args.repeats})", flush=True)
            for path in Path(tmp).iterdir():
                path.unlink()
    small, large = sizes[0], sizes[-1]
    ratio = large / small
    print(f"\ntime at {large:,d} / time at {small:,d} (linear: ~{ratio:.0f}; quadratic: ~{ratio ** 2:.0f})")
    for name, by_size in results.items():
        print(f"{name:13s} {by_size[large]:7.3f} s / {by_size[small]:7.3f} s = {by_size[large] / by_size[small]:5.1f}")


if __name__ == "__main__":
    main()
