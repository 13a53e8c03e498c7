"""`uniadapter eval`'s work: MSRVTT 1k-A data and train lists reach the readers, and retrieval is reported
by the paper's protocol (every caption, ITM over the ITC top K_TEST)."""

from __future__ import annotations

import json
from argparse import Namespace

from uniadapter_serve.adapters.cli_tasks import load_data, run_eval


def test_msrvtt_train_list_and_1k_a_test(tmp_path):
    release = {"videos": [{"video_id": f"video{i}", "split": "train"} for i in range(4)],
               "sentences": [{"video_id": f"video{i}", "caption": f"clip {i}, take {j}"} for i in range(4)
                             for j in range(3)]}
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps(release))
    (tmp_path / "MSRVTT_train.9k.csv").write_text("video_id\nvideo2\nvideo0\n")
    (tmp_path / "msrvtt_test.jsonl").write_text('{"clip_name": "video3", "caption": "a test clip"}\n'
                                                '{"clip_name": "video1", "caption": "another"}\n')
    common = {"data": "msrvtt", "n": 100, "image_size": 32, "seed": 0, "media_root": str(tmp_path)}
    train = load_data("retrieval", "train", annotations=str(tmp_path / "MSRVTT_data.json"),
                      video_list=str(tmp_path / "MSRVTT_train.9k.csv"), **common)
    assert [(it.key, len(it.captions)) for it in train] == [("video2", 3), ("video0", 3)]
    test = load_data("retrieval", "test", annotations=str(tmp_path / "msrvtt_test.jsonl"), **common)
    assert [(it.key, it.captions) for it in test] == [("video3", ["a test clip"]), ("video1", ["another"])]


def test_eval_reports_the_papers_protocol_both_ways():
    args = Namespace(task="retrieval", backbone="blip-tiny", adapter=None, num_frames=8, split="test", data="demo",
                     examples=6, seed=0, annotations=None, questions=None, media_root=None)
    report = run_eval(args)
    assert report["examples"] == 6 and report["captions"] == 6  # the demo world: one caption per scene
    for d in ("t2i", "i2t"):
        for k in (1, 5, 10):
            assert 0 <= report[f"itm_{d}_r@{k}"] <= 1 and 0 <= report[f"{d}_r@{k}"] <= 1
