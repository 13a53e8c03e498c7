"""Annotation readers (on small hand-written files of each real format) and the official VQA v2 accuracy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from uniadapter_serve.adapters.datasets import (
    QA,
    leave_one_out_accuracy,
    normalize_answer,
    read_karpathy,
    read_msrvtt,
    read_msrvtt_qa,
    read_video_list,
    read_vqa_v2,
    vqa_accuracy,
)
from uniadapter_serve.errors import InputError

# -- the official VQA v2 accuracy ---------------------------------------------------------------------


def leave_one_out_reference(prediction: str, humans: list[str]) -> float:
    """The metric's definition, literally: for each human left out, min(#others who gave it / 3, 1)."""
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1:]
        scores.append(min(sum(a == prediction for a in others) / 3, 1.0))
    return sum(scores) / len(scores)


@pytest.mark.parametrize(("agreeing", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(agreeing, expected):
    humans = ["cat"] * agreeing + ["dog", "bird", "fish", "horse", "cow", "sheep", "goat", "duck", "frog",
                                   "mouse"][:10 - agreeing]
    assert vqa_accuracy("cat", humans) == pytest.approx(expected)
    assert leave_one_out_accuracy(agreeing, 10) == pytest.approx(expected)


def test_leave_one_out_matches_the_definition_for_any_number_of_humans():
    rng = random.Random(0)
    for _ in range(200):
        humans = [rng.choice("abc") for _ in range(rng.randint(1, 12))]
        guess = rng.choice("abcd")
        assert vqa_accuracy(guess, humans) == pytest.approx(leave_one_out_reference(guess, humans))


def test_vqa_accuracy_takes_the_human_answers_not_weights():
    with pytest.raises(TypeError, match=r"QA\.accuracy"):
        vqa_accuracy("cat", {"cat": 0.3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no human answers"):
        vqa_accuracy("cat", [])


@pytest.mark.parametrize(("raw", "normal"), [
    ("The Two dogs!", "2 dogs"),
    ("Yes.", "yes"),
    ("2.5", "2.5"),  # a decimal point stays
    ("100,978", "100978"),  # a comma between digits: no space
    ("black-and-white", "black and white"),  # punctuation becomes a space...
    ("red , blue", "red blue"),  # ...or goes, next to a space
    ("(red)", "red"),
    ("girl's", "girl's"),  # apostrophes stay: possessives are not plurals
    ("2:50 pm", "2:50 pm"),  # colons stay: times
    ("dont", "don't"),
    ("Im sure it isnt", "i'm sure it isn't"),
    ("an apple", "apple"),
    ("a", ""),
    ("None", "0"),
    ("ten", "10"),
    ("  two\tcats\n", "2 cats"),
])
def test_normalize_answer_follows_the_vqa_evaluation(raw, normal):
    assert normalize_answer(raw) == normal


def test_human_answers_are_normalised_before_matching():
    humans = ["Two", "2", "two.", "3", "three", "3", "Three!", "four", "5", "six"]
    assert vqa_accuracy("2", humans) == pytest.approx(0.9)
    assert vqa_accuracy("the three", humans) == pytest.approx(1.0)
    assert vqa_accuracy("4", humans) == pytest.approx(0.3)


def test_qa_accuracy_from_counts_equals_the_metric_on_the_answers():
    rng = random.Random(1)
    for _ in range(100):
        humans = [rng.choice(["yes", "no", "maybe"]) for _ in range(10)]
        counts = {a: humans.count(a) / 10 for a in set(humans)}
        qa = QA("x.jpg", "q?", counts, humans=10)
        for guess in ("yes", "no", "maybe", "never"):
            assert qa.accuracy(guess) == pytest.approx(leave_one_out_reference(guess, humans))
    assert QA("x.jpg", "q?", {"2": 1.0}).accuracy("Two") == 1.0  # a single reference answer: exact match
    assert QA("x.jpg", "q?", {"2": 1.0}).accuracy("3") == 0.0
    # answers written by hand, not normalised by a reader, are matched after normalisation too
    assert QA("x.jpg", "q?", {"A Circle": 1.0}).accuracy("circle") == 1.0
    assert QA("x.jpg", "q?", {"Two": 0.2, "2": 0.1, "3": 0.7}, humans=10).accuracy("two") == pytest.approx(0.9)


# -- COCO / Flickr Karpathy ---------------------------------------------------------------------------

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
    (tmp_path / "k.json").write_text(KARPATHY.replace('"sentences": [{"raw": "A dog."}]', '"sentence": []'))
    with pytest.raises(InputError, match=r"k\.json:5: missing field\(s\) \['sentences'\]"):
        read_karpathy(tmp_path / "k.json", "/coco")
    (tmp_path / "broken.json").write_text(KARPATHY.replace('"split": "train"', '"split" "train"'))
    with pytest.raises(InputError, match=r"broken\.json:5:\d+: malformed JSON"):
        read_karpathy(tmp_path / "broken.json", "/coco")
    (tmp_path / "tail.json").write_text(KARPATHY.replace('"dataset": "coco"', '"dataset": coco'))
    with pytest.raises(InputError, match=r"tail\.json:6:\d+: malformed JSON"):  # after the list, still checked
        read_karpathy(tmp_path / "tail.json", "/coco")
    (tmp_path / "other.json").write_text('{"dataset": "coco", "pictures": []}')
    with pytest.raises(InputError, match=r"other\.json: expected a JSON list under 'images'"):
        read_karpathy(tmp_path / "other.json", "/coco")


def test_the_list_is_found_by_its_key_not_by_a_string_that_looks_like_it(tmp_path):
    """A value spelling '"images"' before the real member must not be taken for it."""
    data = {"info": {"note": 'see "images": [0]'}, "images": [
        {"filepath": "", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "x"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(data, indent=2))
    assert [it.image for it in read_karpathy(tmp_path / "k.json", "/r")] == ["/r/x.jpg"]


def test_line_numbers_are_right_deep_into_a_file(tmp_path):
    images = [{"filepath": "", "filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": "x"}]}
              for i in range(3000)]
    images[2718] = {"filepath": "", "filename": "bad.jpg", "split": "test"}
    text = json.dumps({"images": images}, indent=1)
    (tmp_path / "k.json").write_text(text)
    line = text[:text.rindex("{", 0, text.index('"bad.jpg"'))].count("\n") + 1  # where the record opens
    with pytest.raises(InputError, match=rf"k\.json:{line}: missing field"):
        read_karpathy(tmp_path / "k.json", "/r")


class _CountingText(str):
    """A file's text that adds up how many characters `count` scans."""

    scanned = 0

    def count(self, sub, start=None, end=None):  # type: ignore[override]
        lo = 0 if start is None else start
        hi = len(self) if end is None else end
        _CountingText.scanned += max(0, min(hi, len(self)) - lo)
        return str.count(self, sub, lo, hi)


def test_line_numbers_are_counted_on_not_recounted_from_the_start(tmp_path, monkeypatch):
    """Reading is linear: counting lines scans the file once, whatever the number of records (the timing
    itself is in bench/datasets_read.py)."""
    questions = [{"image_id": i, "question": "what?", "question_id": i} for i in range(2000)]
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"questions": questions}, indent=1))
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: _CountingText(read_text(self, *a, **k)))
    _CountingText.scanned = 0
    assert len(read_vqa_v2(path, None, "/coco")) == 2000
    size = len(path.read_text())
    assert 0 < _CountingText.scanned <= size


# -- VQA v2 -------------------------------------------------------------------------------------------


def test_vqa_v2(tmp_path):
    questions = {"questions": [{"image_id": 42, "question": "What color is the cat?", "question_id": 420},
                               {"image_id": 7, "question": "How many?", "question_id": 70},
                               {"image_id": 7, "question": "Where?", "question_id": 71}]}
    answers = {"annotations": [
        {"question_id": 420, "answers": [{"answer": "Black"}] * 7 + [{"answer": "gray"}] * 3},
        {"question_id": 70, "answers": [{"answer": "two"}] * 9 + [{"answer": "2."}]},
        {"question_id": 71, "answers": [{"answer": w} for w in ("park", "a park", "yard", "garden", "lawn", "field",
                                                                "grass", "outside", "home", "the yard")]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions, indent=1))
    (tmp_path / "a.json").write_text(json.dumps(answers, indent=1))
    qas = read_vqa_v2(tmp_path / "q.json", tmp_path / "a.json", "/coco/val2014")
    assert qas[0].media == "/coco/val2014/COCO_val2014_000000000042.jpg"
    assert [q.humans for q in qas] == [10, 10, 10]
    assert qas[0].best == "black" and qas[1].best == "2"
    assert qas[0].accuracy("black") == 1.0
    assert qas[0].accuracy("gray") == pytest.approx(0.9)  # 3 humans: 0.9, not full credit
    assert qas[1].accuracy("Two") == 1.0 and qas[0].accuracy("white") == 0.0
    assert qas[2].accuracy("park") == pytest.approx(0.6) and qas[2].accuracy("lawn") == pytest.approx(0.3)
    answers["annotations"][1]["answers"][3] = {"text": "two"}
    (tmp_path / "a.json").write_text(json.dumps(answers, indent=1))
    with pytest.raises(InputError, match=r"a\.json:\d+: each answer needs an 'answer' field"):
        read_vqa_v2(tmp_path / "q.json", tmp_path / "a.json", "/coco/val2014")
    questions["questions"][2]["question_id"] = "seventy-one"
    (tmp_path / "q.json").write_text(json.dumps(questions, indent=1))
    with pytest.raises(InputError, match=r"q\.json:\d+: 'question_id' must be an integer"):
        read_vqa_v2(tmp_path / "q.json", None, "/coco/val2014")


# -- MSRVTT -------------------------------------------------------------------------------------------

RELEASE = {"videos": [{"video_id": f"video{i}", "split": "train" if i < 3 else "test"} for i in range(5)],
           "sentences": [{"sen_id": 2 * i + j, "video_id": f"video{i}", "caption": f"clip {i} caption {j}"}
                         for i in range(5) for j in range(2)]}


def test_msrvtt_release_file(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps(RELEASE, indent=1))
    test = read_msrvtt(tmp_path / "m.json", "/videos", split="test")
    assert [it.key for it in test] == ["video3", "video4"] and test[0].image == "/videos/video3.mp4"
    assert test[1].captions == ["clip 4 caption 0", "clip 4 caption 1"]
    assert len(read_msrvtt(tmp_path / "m.json", "/videos")) == 5
    (tmp_path / "one_line.json").write_text(json.dumps(RELEASE) + "\n")  # minified: not taken for JSON lines
    assert read_msrvtt(tmp_path / "one_line.json", "/videos", split="test") == test
    bad = {**RELEASE, "sentences": [*RELEASE["sentences"], {"video_id": "video9", "caption": "?"}]}
    (tmp_path / "m.json").write_text(json.dumps(bad, indent=1))
    with pytest.raises(InputError, match=r"m\.json:\d+: caption for unknown video 'video9'"):
        read_msrvtt(tmp_path / "m.json", "/videos")


def test_msrvtt_1k_a_test_as_blip_json_lines(tmp_path):
    """BLIP's msrvtt_test.jsonl: one {"clip_name", "caption"} per line, one caption per video."""
    lines = [{"clip_name": "video7020", "caption": "a woman creating a fondant baby and flower"},
             {"clip_name": "video7021", "caption": "a man talks about cars"}, {"clip_name": "video7022",
                                                                               "caption": "kids play"}]
    (tmp_path / "msrvtt_test.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    items = read_msrvtt(tmp_path / "msrvtt_test.jsonl", "/videos", split="test")
    assert [(it.key, it.image, it.captions) for it in items] == [
        (x["clip_name"], f"/videos/{x['clip_name']}.mp4", [x["caption"]]) for x in lines]
    assert read_msrvtt(tmp_path / "msrvtt_test.jsonl", "/videos", split="train") == items  # one split per file
    (tmp_path / "renamed.json").write_text((tmp_path / "msrvtt_test.jsonl").read_text())  # sniffed, not by name
    assert read_msrvtt(tmp_path / "renamed.json", "/videos") == items


def test_msrvtt_json_list_of_video_and_caption(tmp_path):
    """LAVIS's msrvtt_ret_*.json: a list of {"video", "caption"}; a caption may be a list; records of the
    same video are one item."""
    records = [{"video": "video0.mp4", "caption": "a man sings"}, {"video": "video1.mp4", "caption": ["a", "b"]},
               {"video": "video0.mp4", "caption": "someone is singing"}, {"video_id": 2, "caption": "two"}]
    (tmp_path / "train.json").write_text(json.dumps(records, indent=2))
    items = read_msrvtt(tmp_path / "train.json", "/v")
    assert [(it.key, it.image, it.captions) for it in items] == [
        ("video0", "/v/video0.mp4", ["a man sings", "someone is singing"]), ("video1", "/v/video1.mp4", ["a", "b"]),
        ("video2", "/v/video2.mp4", ["two"])]


def test_msrvtt_jsfusion_csv(tmp_path):
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7579,video7579,a girl wearing red top and black trouser\n"
        'ret1,msr7725,video7725,"a man, on a stage, sings"\n')
    items = read_msrvtt(tmp_path / "MSRVTT_JSFUSION_test.csv", "/v")
    assert [(it.key, it.captions) for it in items] == [
        ("video7579", ["a girl wearing red top and black trouser"]), ("video7725", ["a man, on a stage, sings"])]
    (tmp_path / "short.csv").write_text("key,vid_key,video_id,sentence\nret0,msr7579\n")
    with pytest.raises(InputError, match=r"short\.csv:2: the row has fewer fields"):
        read_msrvtt(tmp_path / "short.csv", "/v")
    (tmp_path / "ids.csv").write_text("video_id\nvideo1\n")
    with pytest.raises(InputError, match=r"ids\.csv:1: the header lacks column\(s\) \['sentence'\]"):
        read_msrvtt(tmp_path / "ids.csv", "/v")


@pytest.mark.parametrize(("name", "text"), [
    ("MSRVTT_train.9k.csv", "video_id\nvideo4\nvideo0\nvideo2\n"),
    ("train_list_jsfusion.txt", "video4\nvideo0\n\nvideo2\n"),
])
def test_msrvtt_train_lists_pick_their_videos_with_all_captions(tmp_path, name, text):
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(RELEASE, indent=1))
    (tmp_path / name).write_text(text)
    items = read_msrvtt(tmp_path / "MSRVTT_data.json", "/v", split="train", video_list=tmp_path / name)
    assert [it.key for it in items] == ["video4", "video0", "video2"]  # the list decides, not the release split
    assert all(len(it.captions) == 2 for it in items)
    assert [k for k, _ in read_video_list(tmp_path / name)] == ["video4", "video0", "video2"]


def test_msrvtt_train_list_naming_an_unknown_video(tmp_path):
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(RELEASE, indent=1))
    (tmp_path / "MSRVTT_train.7k.csv").write_text("video_id\nvideo1\nvideo8\n")
    with pytest.raises(InputError, match=r"MSRVTT_train\.7k\.csv:3: video 'video8' has no captions"):
        read_msrvtt(tmp_path / "MSRVTT_data.json", "/v", video_list=tmp_path / "MSRVTT_train.7k.csv")
    (tmp_path / "list.txt").write_text("video1\nvideo2 video3\n")
    with pytest.raises(InputError, match=r"list\.txt:2: expected one video per line"):
        read_video_list(tmp_path / "list.txt")


@pytest.mark.parametrize(("record", "message"), [
    ({"video": "video3.mp4"}, "needs the video .* and its 'caption'"),
    ({"caption": "no video"}, "needs the video"),
    ({"video": "video3.mp4", "caption": ""}, "non-empty string"),
    ({"video": "video3.mp4", "caption": ["ok", 3]}, "non-empty string or a non-empty list"),
    ({"video": None, "caption": "x"}, "must be a name or a number"),
    (["video3.mp4", "x"], "expected an object, got list"),
])
def test_msrvtt_bad_record_names_file_and_line(tmp_path, record, message):
    good = [{"video": f"video{i}.mp4", "caption": f"c{i}"} for i in range(3)]
    (tmp_path / "list.json").write_text(json.dumps([*good, record, *good], indent=1))
    line = 1 + 3 * 4 + 1  # '[' then three records of four lines each (indent=1)
    with pytest.raises(InputError, match=rf"list\.json:{line}: .*{message}"):
        read_msrvtt(tmp_path / "list.json", "/v")
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in [*good, record]))
    with pytest.raises(InputError, match=rf"lines\.jsonl:4: .*{message}"):
        read_msrvtt(tmp_path / "lines.jsonl", "/v")


def test_msrvtt_malformed_json_lines(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"clip_name": "video1", "caption": "x"}\n{"clip_name": "video2", \n')
    with pytest.raises(InputError, match=r"t\.jsonl:2:\d+: malformed JSON"):
        read_msrvtt(tmp_path / "t.jsonl", "/v")


def test_msrvtt_qa(tmp_path):
    qa = [{"video_id": 7010, "question": "what is a man doing?", "answer": "singing"},
          {"video": "video7011.mp4", "question": "who plays?", "answer": "a cat"}]
    (tmp_path / "qa.json").write_text(json.dumps(qa, indent=1))
    qas = read_msrvtt_qa(tmp_path / "qa.json", "/videos")
    assert [q.media for q in qas] == ["/videos/video7010.mp4", "/videos/video7011.mp4"]
    assert qas[1].best == "cat" and qas[1].humans == 0 and qas[1].accuracy("the cat") == 1.0
    (tmp_path / "qa.json").write_text(json.dumps([*qa, {"video_id": 1, "question": "q"}], indent=1))
    with pytest.raises(InputError, match=r"qa\.json:\d+: missing field\(s\) \['answer'\]"):
        read_msrvtt_qa(tmp_path / "qa.json", "/videos")


def test_missing_file_is_an_input_error(tmp_path):
    for read in (lambda p: read_msrvtt(p, "/v"), lambda p: read_karpathy(p, "/v"), read_video_list):
        with pytest.raises(InputError, match=r"nope\.json: cannot read"):
            read(tmp_path / "nope.json")
