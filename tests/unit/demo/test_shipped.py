"""The shipped demo model: its held-out scores reach the issue's targets and are the ones results.json
and the README report; a short adapter training on it learns without touching the backbone; and every shipped set
and the backbone carry a small golden record that they reproduce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from uniadapter_serve.adapters.datasets import demo_images, demo_vqa
from uniadapter_serve.adapters.demo.build import ANSWERS, DEMO_ROOT, SET_NAMES, evaluate, results_table
from uniadapter_serve.adapters.evaluation import position_probe
from uniadapter_serve.adapters.format import load_adapter_set
from uniadapter_serve.adapters.golden import GOLDEN_FILE, Prober, read_record
from uniadapter_serve.adapters.training import TrainConfig, freeze_check, train
from uniadapter_serve.adapters.verification import Verifier
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.tokenizer import load_answer_list, load_tokenizer

README = Path(__file__).parents[3] / "README.md"
TARGETS = {"retrieval": ("itm_t2i_r@1", 0.7), "vqa": ("accuracy", 0.9), "videoqa": ("accuracy", 0.9)}
"""the issue's targets on each task's main figure; retrieval is scored by the paper's protocol (ITC top-16
re-ranked by ITM alone, ordered by the match probability as the service orders)"""
KIND_TARGETS = {"vqa-side": ("vqa", "accuracy_side", 0.9), "videoqa-direction": ("videoqa", "accuracy_direction", 0.8)}
"""the question kinds that need position: a lone shape's side, the direction of motion"""
POSITION_PROBE = 0.9
"""a linear probe on the frozen backbone reads a lone shape's side at least this well (from [CLS])"""
ABOVE_HEADS = 0.15
"""UniAdapter's lead over the frozen backbone with trained heads"""
NEAR_FULL = 0.05
"""how far UniAdapter may trail full fine-tuning (same steps)"""
VQA_PATH = ("the set answers 'right' to every side question: trained on lone shapes' sides alone it learns them "
            "(0.92 in 300 steps at lr 1e-2; at chance at 4e-3), but in the build's mixed training it stays at chance "
            "at every learning rate tried, also with sides drawn 4x as often (bench/vqa_side.py; see README)")
RELATION = ("the backbone keeps where shapes are but does not bind which shape is where: two shapes' left/right "
            "relation is read at 0.37 (full fine-tuning, which re-learns it in the ViT: 0.79; see README)")
MISSED = {"retrieval": pytest.mark.xfail(strict=True, reason=f"R@1 0.62 < 0.7 (sides 0.88): {RELATION}"),
          "vqa": pytest.mark.xfail(strict=True, reason=f"0.83 < 0.9, left/right 0.50: {VQA_PATH}"),
          "vqa-side": pytest.mark.xfail(strict=True, reason=f"left/right 0.50 < 0.9: {VQA_PATH}"),
          "videoqa": pytest.mark.xfail(strict=True, reason="0.84 < 0.9, direction of motion 0.26: as VQA's sides, "
                                       "the question path does not read where the shape went (see README)"),
          "videoqa-direction": pytest.mark.xfail(strict=True, reason="direction 0.26 < 0.8 (full fine-tuning 0.27): "
                                                 "the question path does not read position (see README)")}
"""targets this build did not reach (strict: a build that reaches one must drop its mark)"""
NOT_ABOVE_HEADS: dict[str, pytest.MarkDecorator] = {}
NOT_NEAR_FULL = {"retrieval": pytest.mark.xfail(
    strict=True, reason=f"R@1 0.62 vs full fine-tuning 0.89, which binds shapes to places in the ViT: {RELATION}")}


@pytest.fixture(scope="module")
def shipped():
    backbone = load_backbone("demo")
    assert (DEMO_ROOT / "backbone" / "model.safetensors").is_file(), "the trained demo backbone must ship"
    return backbone, load_tokenizer("demo", backbone.config), World(seed=0)


@pytest.fixture(scope="module")
def results():
    return json.loads((DEMO_ROOT / "results.json").read_text())


def test_backbone_is_small_enough_to_ship():
    assert (DEMO_ROOT / "backbone" / "model.safetensors").stat().st_size < 15 * 1024 * 1024


@pytest.fixture(scope="module")
def scores(shipped):
    """Held-out scores of the shipped sets, evaluated here from the shipped files."""
    backbone, tok, world = shipped
    return {task: evaluate(task, backbone, tok,
                           load_adapter_set(DEMO_ROOT / "adapters" / name / "v1", backbone).module, world)
            for task, name in SET_NAMES.items()}


@pytest.mark.parametrize("task", list(SET_NAMES))
def test_results_json_reports_what_the_shipped_sets_score(scores, results, shipped, task):
    """results.json (and so the README) holds what the shipped files score (up to the float reduction
    order of another thread count: one flipped ranking moves a figure by 1/500), far above chance."""
    _, _, world = shipped
    assert scores[task] == pytest.approx(results["tasks"][task]["uniadapter"]["metrics"], abs=0.005)
    key, _ = TARGETS[task]
    chance = 1 / len(ANSWERS) if task != "retrieval" else _retrieval_chance(world)
    assert scores[task][key] >= 3 * chance


def _marked(marks: dict[str, pytest.MarkDecorator], names: Any = SET_NAMES) -> list[Any]:
    return [pytest.param(t, marks=marks[t]) if t in marks else t for t in names]


@pytest.mark.parametrize("task", _marked(NOT_ABOVE_HEADS))
def test_far_above_heads_only(scores, results, task):
    key, _ = TARGETS[task]
    assert scores[task][key] >= results["tasks"][task]["heads"]["metrics"][key] + ABOVE_HEADS


@pytest.mark.parametrize("task", _marked(NOT_NEAR_FULL))
def test_near_full_fine_tuning_with_the_same_steps(scores, results, task):
    key, _ = TARGETS[task]
    full = results["tasks"][task]["full"]
    assert full["steps"] == results["tasks"][task]["uniadapter"]["steps"] == results["tasks"][task]["heads"]["steps"]
    assert scores[task][key] >= full["metrics"][key] - NEAR_FULL


@pytest.mark.parametrize("task", _marked(MISSED, TARGETS))
def test_shipped_sets_reach_the_targets_on_held_out_data(scores, task):
    key, target = TARGETS[task]
    assert scores[task][key] >= target, scores[task]


@pytest.mark.parametrize("target", _marked(MISSED, KIND_TARGETS))
def test_the_questions_of_position_reach_their_targets(scores, target):
    task, key, value = KIND_TARGETS[target]
    assert scores[task][key] >= value, scores[task]


def test_the_backbone_keeps_position(shipped, results):
    """A linear probe on the frozen shipped backbone reads a lone shape's side (chance 0.5), as results.json
    reports it (the build probes with these sizes)."""
    backbone, _, world = shipped
    probe = position_probe(backbone, world)
    assert probe == pytest.approx(results["backbone"]["position_probe"], abs=0.005)
    assert probe["cls"] >= POSITION_PROBE, probe


def _retrieval_chance(world: World) -> float:
    """Expected R@1 of a random ranking: the share of images that match each query."""
    keys = [it.key for it in demo_images(world, "test", 500)]
    return float(np.mean([keys.count(k) / len(keys) for k in keys]))


def test_readme_shows_the_measured_table(results):
    assert results_table(results) in README.read_text()


def test_bare_backbone_cannot_answer(shipped):
    """The pre-trained backbone alone (no set) is near chance at VQA: the sets do the work."""
    backbone, tok, world = shipped
    assert evaluate("vqa", backbone, tok, None, world)["accuracy"] < 0.5


def test_adapter_training_from_the_shipped_backbone(shipped):
    """A short training on the shipped backbone lowers the loss and leaves every backbone tensor bit-identical
    (the training itself is tested at length on a tiny config in test_training.py)."""
    backbone, tok, world = shipped
    unchanged = freeze_check(backbone)
    result = train(backbone, tok, demo_vqa(world, "train", 64),
                   TrainConfig(task="vqa", steps=30, batch_size=8, lr=1e-2, bottleneck=8, kv_rank=4), progress=False)
    assert np.mean(result.losses[-6:]) < 0.8 * np.mean(result.losses[:6])
    assert unchanged()
    assert backbone.fingerprints == load_backbone("demo").fingerprints


def test_default_answer_list_is_the_demo_worlds():
    assert load_answer_list() == ANSWERS == json.loads((DEMO_ROOT / "backbone" / "answer_list.json").read_text())


GOLDEN_SUBJECTS = {"backbone": DEMO_ROOT / "backbone",
                   **{name: DEMO_ROOT / "adapters" / name / "v1" for name in SET_NAMES.values()}}
"""every shipped golden record's folder"""


@pytest.mark.parametrize("subject", list(GOLDEN_SUBJECTS))
def test_shipped_golden_records_verify(shipped, subject):
    """Each shipped record (fp32, CPU) is reproduced by the shipped backbone in fp32, as a server checks it."""
    backbone, tok, _ = shipped
    record = read_record(GOLDEN_SUBJECTS[subject])
    assert record is not None, f"{subject} ships no {GOLDEN_FILE}"
    assert (record.device, record.dtype) == ("cpu", "float32")
    verifier = Verifier(Prober(backbone, tok, load_answer_list(DEMO_ROOT / "backbone" / "answer_list.json")))
    if subject == "backbone":
        assert record.subject == "backbone"
        verdict = verifier.verify(record, None, subject)
    else:
        loaded = load_adapter_set(GOLDEN_SUBJECTS[subject], backbone)
        assert record.subject == "set" and record.ref == loaded.meta.ref
        verdict = verifier.verify(record, loaded.module, subject, loaded.meta.answer_list)
    assert verdict.ok, verdict.message()


@pytest.mark.parametrize("subject", list(GOLDEN_SUBJECTS))
def test_shipped_golden_records_are_small(subject):
    assert (GOLDEN_SUBJECTS[subject] / GOLDEN_FILE).stat().st_size < 8 * 1024
