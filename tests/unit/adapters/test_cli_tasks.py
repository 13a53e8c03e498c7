"""`uniadapter train` and `uniadapter eval`'s work: MSRVTT 1k-A data and train lists reach the readers, retrieval
is reported by the paper's protocol (every caption, ITM over the ITC top K_TEST), and a trained set is written with
its golden record."""

from __future__ import annotations

import json
from argparse import Namespace

from uniadapter_serve.adapters.cli_tasks import load_data, run_eval, run_train
from uniadapter_serve.adapters.format import load_adapter_set
from uniadapter_serve.adapters.golden import GOLDEN_FILE, Prober, read_record
from uniadapter_serve.adapters.verification import Verifier
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.tokenizer import load_answer_list, load_tokenizer


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


def test_a_trained_set_carries_a_golden_record_that_verifies(tmp_path):
    """`uniadapter train` writes golden.json with the set: of this version, scoring the set's own answer list,
    reproduced by a server's Verifier on the same backbone."""
    args = Namespace(backbone="blip-tiny", task="vqa", mode="uniadapter", data="demo", examples=8, seed=0, steps=2,
                     batch_size=4, lr=1e-3, bottleneck=8, kv_rank=4, num_frames=8, annotations=None, questions=None,
                     media_root=None, answer_list=None, name="trained", out=str(tmp_path / "set"), quiet=True)
    report = run_train(args)
    assert report["golden"] == str(tmp_path / "set" / GOLDEN_FILE)
    record = read_record(tmp_path / "set")
    assert record is not None and record.subject == "set" and record.ref == f"trained@{report['version']}"
    backbone = load_backbone("blip-tiny")
    loaded = load_adapter_set(tmp_path / "set", backbone)
    assert loaded.meta.answer_list is not None
    assert record.probes["answer_scores"]["answers"] == loaded.meta.answer_list[:8]
    verifier = Verifier(Prober(backbone, load_tokenizer("blip-tiny", backbone.config), load_answer_list(None)))
    verifier.check_set(loaded.meta, loaded.module)
    assert verifier.outcomes[loaded.meta.ref].result == "pass"
