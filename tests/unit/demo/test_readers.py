"""Readers of the real benchmarks' annotation formats, on small hand-written files."""

from __future__ import annotations

import json

import pytest

from uniadapter_serve.adapters.datasets import (
    normalize_answer,
    read_karpathy,
    read_msrvtt,
    read_msrvtt_qa,
    read_vqa_v2,
)
from uniadapter_serve.errors import InputError

KARPATHY = """{"images": [
  {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test",
   "sentences": [{"raw": "A man riding a horse."}, {"raw": "A horse and its rider."}]},
  {"filepath": "train2014", "filename": "a.jpg", "split": "restval", "sentences": [{"raw": "A cat."}]},
  {"filepath": "train2014", "filename": "b.jpg", "split": "train", "sentences": [{"raw": "A dog."}]}
], "dataset": "coco"}
"""


def test_karpathy(tmp_path):
    (tmp_path / "k.json").write_text(KARPATHY)
    test = read_karpathy(tmp_path / "k.json", "/coco", split="test")
    assert len(test) == 1 and test[0].image == "/coco/val2014/COCO_val2014_000000000042.jpg"
    assert test[0].captions == ["A man riding a horse.", "A horse and its rider."]
    assert [it.captions[0] for it in read_karpathy(tmp_path / "k.json", "/coco", split="train")] == ["A cat.", "A dog."]


def test_karpathy_malformed_record_names_its_line(tmp_path):
    bad = KARPATHY.replace('"sentences": [{"raw": "A dog."}]', '"sentence": []')
    (tmp_path / "k.json").write_text(bad)
    with pytest.raises(InputError, match=r"k\.json:5: missing field\(s\) \['sentences'\]"):
        read_karpathy(tmp_path / "k.json", "/coco")
    (tmp_path / "broken.json").write_text(KARPATHY.replace('"split": "train"', '"split" "train"'))
    with pytest.raises(InputError, match=r"broken\.json:5:\d+: malformed JSON"):
        read_karpathy(tmp_path / "broken.json", "/coco")


def test_vqa_v2(tmp_path):
    questions = {"questions": [{"image_id": 42, "question": "What color is the cat?", "question_id": 420},
                               {"image_id": 7, "question": "How many?", "question_id": 70}]}
    answers = {"annotations": [
        {"question_id": 420, "answers": [{"answer": "Black"}] * 7 + [{"answer": "gray"}] * 3},
        {"question_id": 70, "answers": [{"answer": "two"}] * 10}]}
    (tmp_path / "q.json").write_text(json.dumps(questions, indent=1))
    (tmp_path / "a.json").write_text(json.dumps(answers, indent=1))
    qas = read_vqa_v2(tmp_path / "q.json", tmp_path / "a.json", "/coco/val2014")
    assert qas[0].media == "/coco/val2014/COCO_val2014_000000000042.jpg"
    assert qas[0].best == "black" and qas[1].best == "2"
    assert qas[0].accuracy("black") == 1.0
    assert qas[0].accuracy("gray") == pytest.approx(0.9)  # 3 of 10 humans: VQA v2's leave-one-out average
    assert qas[1].accuracy("Two") == 1.0 and qas[0].accuracy("white") == 0.0
    answers["annotations"][1]["answers"][3] = {"text": "two"}
    (tmp_path / "a.json").write_text(json.dumps(answers, indent=1))
    with pytest.raises(InputError, match=r"a\.json:\d+: each answer needs an 'answer' field"):
        read_vqa_v2(tmp_path / "q.json", tmp_path / "a.json", "/coco/val2014")


def test_msrvtt_and_qa(tmp_path):
    data = {"videos": [{"video_id": "video0", "split": "train"}, {"video_id": "video1", "split": "test"}],
            "sentences": [{"video_id": "video0", "caption": "a man is singing"},
                          {"video_id": "video1", "caption": "a cat plays"},
                          {"video_id": "video1", "caption": "a kitten is playing"}]}
    (tmp_path / "m.json").write_text(json.dumps(data, indent=1))
    test = read_msrvtt(tmp_path / "m.json", "/videos", split="test")
    assert len(test) == 1 and test[0].image == "/videos/video1.mp4" and len(test[0].captions) == 2
    data["sentences"].append({"video_id": "video9", "caption": "?"})
    (tmp_path / "m.json").write_text(json.dumps(data, indent=1))
    with pytest.raises(InputError, match=r"m\.json:\d+: caption for unknown video 'video9'"):
        read_msrvtt(tmp_path / "m.json", "/videos")
    qa = [{"video_id": 7010, "question": "what is a man doing?", "answer": "singing"},
          {"video": "video7011.mp4", "question": "who plays?", "answer": "a cat"}]
    (tmp_path / "qa.json").write_text(json.dumps(qa, indent=1))
    qas = read_msrvtt_qa(tmp_path / "qa.json", "/videos")
    assert [q.media for q in qas] == ["/videos/video7010.mp4", "/videos/video7011.mp4"]
    assert qas[1].best == "cat"
    (tmp_path / "qa.json").write_text(json.dumps([*qa, {"video_id": 1, "question": "q"}], indent=1))
    with pytest.raises(InputError, match=r"qa\.json:\d+: missing field\(s\) \['answer'\]"):
        read_msrvtt_qa(tmp_path / "qa.json", "/videos")


def test_normalize_answer():
    assert normalize_answer("The Two dogs!") == "2 dogs"
