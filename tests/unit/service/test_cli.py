"""The `uniadapter` command: adapters inspect, and the installed console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from uniadapter_serve.adapters.format import BackboneInfo, save_adapter_set
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.service.cli import main


@pytest.fixture
def set_and_backbone(backbone, tiny_config, tmp_path):
    module = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8), seed=51)
    version = save_adapter_set(module, tmp_path / "set", name="ret", backbone=BackboneInfo.of(backbone))
    from safetensors.torch import save_file

    bb = tmp_path / "backbone"
    bb.mkdir()
    tiny_config.to_json_file(bb / "config.json")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(bb / "model.safetensors"))
    return tmp_path / "set", bb, version, module


def test_inspect_prints_report(set_and_backbone, capsys):
    folder, _, version, module = set_and_backbone
    assert main(["adapters", "inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"ret@{version}" in out and "retrieval" in out and f"{module.num_parameters():,}" in out


def test_inspect_json_with_compatible_backbone(set_and_backbone, capsys):
    folder, bb, version, module = set_and_backbone
    assert main(["adapters", "inspect", str(folder), "--backbone", str(bb), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == version and report["compatible"] is True
    assert report["tunable_parameters"] == module.num_parameters()


def test_inspect_incompatible_backbone_exits_3(set_and_backbone, capsys):
    folder, _, _, _ = set_and_backbone
    assert main(["adapters", "inspect", str(folder), "--backbone", "blip-tiny"]) == 3
    assert "compatible    NO" in capsys.readouterr().out


def test_inspect_missing_folder_is_a_clean_error(tmp_path, capsys):
    assert main(["adapters", "inspect", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "uniadapter"
    result = subprocess.run([str(script), "adapters", "inspect", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--backbone" in result.stdout


def test_train_then_eval_on_the_demo_world(tmp_path, capsys):
    out = tmp_path / "set"
    assert main(["train", "--task", "vqa", "--backbone", "blip-tiny", "--examples", "20", "--steps", "4",
                 "--batch-size", "4", "--bottleneck", "4", "--kv-rank", "2", "--out", str(out), "--name", "tiny-vqa",
                 "--quiet"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 4 and trained["tunable_parameters"] > 0 and (out / "adapter_config.json").is_file()
    assert main(["eval", "--task", "vqa", "--backbone", "blip-tiny", "--adapter", str(out), "--examples", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == f"tiny-vqa@{trained['version']}" and 0 <= report["accuracy"] <= 1
    assert main(["eval", "--task", "retrieval", "--backbone", "blip-tiny", "--examples", "12"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["t2i_r@1"] <= 1


@pytest.mark.parametrize(("flag", "mode"), [("--heads-only", "heads"), ("--full-finetune", "full"),
                                            ("--mode=heads", "heads")])
def test_baseline_flags(flag, mode):
    from uniadapter_serve.service.cli import build_parser

    args = build_parser().parse_args(["train", "--task", "vqa", "--out", "o", "--name", "n", flag])
    assert args.mode == mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--task", "vqa", "--out", "o", "--name", "n", "--heads-only",
                                   "--full-finetune"])


def test_train_rejects_data_that_does_not_fit_the_task(tmp_path, capsys):
    assert main(["train", "--task", "vqa", "--backbone", "blip-tiny", "--data", "karpathy", "--media-root",
                 str(tmp_path), "--out", str(tmp_path / "o"), "--name", "x"]) == 2
    assert "does not fit task" in capsys.readouterr().err


def test_train_and_eval_on_msrvtt_files(tmp_path, capsys):
    """MSRVTT and MSRVTT-QA in their own formats, over real encoded clips decoded by PyAV."""
    from support.media import video_bytes

    videos = tmp_path / "videos"
    videos.mkdir()
    palette = [(220, 40, 40), (40, 180, 60), (50, 80, 230), (235, 215, 40)]
    for i in range(4):
        (videos / f"video{i}.mp4").write_bytes(video_bytes(palette[i:] + palette[:i], size=(48, 48)))
    captions = {"videos": [{"video_id": f"video{i}", "split": "train"} for i in range(4)],
                "sentences": [{"video_id": f"video{i}", "caption": f"clip number {i}"} for i in range(4)]}
    (tmp_path / "msrvtt.json").write_text(json.dumps(captions))
    qa = [{"video_id": i, "question": "what colour comes first?", "answer": ["red", "green", "blue", "yellow"][i]}
          for i in range(4)]
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    common = ["--backbone", "blip-tiny", "--media-root", str(videos), "--num-frames", "4"]
    train = ["--steps", "3", "--batch-size", "2", "--bottleneck", "4", "--kv-rank", "2", "--quiet"]

    out = tmp_path / "ret"
    assert main(["train", "--task", "retrieval", "--data", "msrvtt", "--annotations", str(tmp_path / "msrvtt.json"),
                 *common, *train, "--out", str(out), "--name", "msrvtt-ret"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    config = json.loads((out / "adapter_config.json").read_text())["adapter"]
    assert config["num_frames"] == 4 and config["temporal_embedding"] and config["frame_aware_attention"]
    assert main(["eval", "--task", "retrieval", "--data", "msrvtt", "--annotations", str(tmp_path / "msrvtt.json"),
                 "--split", "train", "--adapter", str(out), *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 4 and 0 <= report["t2i_r@1"] <= 1 and report["t2i_r@10"] == 1.0

    out = tmp_path / "vqa"
    assert main(["train", "--task", "videoqa", "--data", "msrvtt-qa", "--questions", str(tmp_path / "qa.json"),
                 *common, *train, "--out", str(out), "--name", "msrvtt-qa"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3
    assert main(["eval", "--task", "videoqa", "--data", "msrvtt-qa", "--questions", str(tmp_path / "qa.json"),
                 "--adapter", str(out), *common]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1


def test_training_names_an_unreadable_video(tmp_path, capsys):
    (tmp_path / "qa.json").write_text(json.dumps([{"video_id": 5, "question": "what?", "answer": "red"}]))
    (tmp_path / "video5.mp4").write_bytes(b"not a video at all")
    assert main(["train", "--task", "videoqa", "--data", "msrvtt-qa", "--questions", str(tmp_path / "qa.json"),
                 "--backbone", "blip-tiny", "--media-root", str(tmp_path), "--steps", "1", "--batch-size", "1",
                 "--out", str(tmp_path / "o"), "--name", "x", "--quiet"]) == 2
    assert "video5.mp4" in capsys.readouterr().err
