"""Adapter training on the tiny backbone: the loss goes down, the backbone stays bit-identical,
checkpoints resume, and the baselines train what they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniadapter_serve.adapters.datasets import ImageText, demo_images, demo_vqa
from uniadapter_serve.adapters.evaluation import answer_accuracy, retrieval_recall
from uniadapter_serve.adapters.training import TrainConfig, freeze_check, train, trained_from
from uniadapter_serve.errors import ConfigError
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.tokenizer import BlipTokenizer

ANSWERS = ["red", "green", "blue", "yellow", "purple", "orange", "1", "2", "left", "right", "yes", "no",
           "circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def setup():
    backbone = load_backbone("blip-tiny")
    world = World(seed=0, image_size=32)
    return backbone, BlipTokenizer.demo(128), world


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_training_lowers_the_loss_and_leaves_the_backbone_bit_identical(setup, task):
    backbone, tok, world = setup
    data = demo_images(world, "train", 64) if task == "retrieval" else demo_vqa(world, "train", 32)
    unchanged = freeze_check(backbone)
    result = train(backbone, tok, data, TrainConfig(task=task, steps=40, batch_size=8, lr=1e-2, bottleneck=8,
                                                    kv_rank=4), progress=False)
    assert np.mean(result.losses[-8:]) < np.mean(result.losses[:8])
    assert unchanged()
    assert result.adapter is not None and not any(p.requires_grad for p in result.adapter.parameters())


def test_checkpoints_resume_to_the_same_weights(setup, tmp_path):
    backbone, tok, world = setup
    data = demo_images(world, "train", 32)
    cfg = TrainConfig(task="retrieval", steps=6, batch_size=4, bottleneck=4, kv_rank=2, checkpoint_every=3)
    straight = train(backbone, tok, data, cfg, progress=False)
    first = train(backbone, tok, data, cfg, checkpoint_dir=tmp_path, progress=False, time_budget_s=0)
    assert len(first.losses) == 3  # stopped at the first checkpoint
    assert (tmp_path / "weights.safetensors").is_file() and (tmp_path / "state.pt").is_file()
    resumed = train(backbone, tok, data, cfg, checkpoint_dir=tmp_path, progress=False)
    assert len(resumed.losses) == 3  # steps 3..5 only
    assert resumed.adapter is not None and straight.adapter is not None
    for key, value in straight.adapter.state_dict().items():
        assert torch.allclose(value, resumed.adapter.state_dict()[key], atol=1e-6), key


@pytest.mark.parametrize(("task", "mode"), [("retrieval", "uniadapter"), ("retrieval", "heads"), ("vqa", "heads"),
                                          ("vqa", "full")])
def test_a_finished_run_is_rebuilt_from_its_last_checkpoint(setup, tmp_path, task, mode):
    """`trained_from` gives back what `train` returned (the adapter, or the trained copy of the backbone) from the
    final checkpoint's weights alone, so a build can score its runs again without training them again."""
    backbone, tok, world = setup
    data = demo_images(world, "train", 16) if task == "retrieval" else demo_vqa(world, "train", 4)
    cfg = TrainConfig(task=task, mode=mode, steps=4, batch_size=4, bottleneck=4, kv_rank=2, checkpoint_every=2)
    result = train(backbone, tok, data, cfg, checkpoint_dir=tmp_path, progress=False)
    model, adapter = trained_from(backbone, cfg, tmp_path / "weights.safetensors")
    trained, rebuilt = (result.adapter, adapter) if result.adapter is not None else (result.backbone, model)
    assert (adapter is None) == (result.adapter is None) and (model is backbone) == (result.backbone is backbone)
    assert rebuilt.state_dict().keys() == trained.state_dict().keys()
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in trained.state_dict().items())


def test_baselines(setup):
    backbone, tok, world = setup
    data = demo_images(world, "train", 32)
    unchanged = freeze_check(backbone)
    heads = train(backbone, tok, data, TrainConfig(task="retrieval", mode="heads", steps=3, batch_size=4),
                  progress=False)
    assert heads.adapter is not None and heads.tunable_parameters == sum(
        p.numel() for p in heads.adapter.parameters()) < 5_000  # vision_proj + text_proj + itm_head
    full = train(backbone, tok, data, TrainConfig(task="retrieval", mode="full", steps=3, batch_size=4),
                 progress=False)
    assert full.backbone is not backbone and full.tunable_parameters == sum(
        p.numel() for p in backbone.parameters())
    assert unchanged()  # full fine-tuning trained a copy
    vqa_heads = train(backbone, tok, demo_vqa(world, "train", 4), TrainConfig(task="vqa", mode="heads", steps=3),
                      progress=False)
    # VQA's head: the answer decoder's prediction head, trained in a copy
    assert vqa_heads.adapter is None and len(vqa_heads.losses) == 3 and vqa_heads.backbone is not backbone
    changed = {k for k, v in vqa_heads.backbone.state_dict().items() if not torch.equal(v, backbone.state_dict()[k])}
    assert changed and all(k.startswith("text_decoder.cls.predictions.") for k in changed)
    assert vqa_heads.tunable_parameters == sum(p.numel() for k, p in backbone.named_parameters()
                                               if k.startswith("text_decoder.cls.predictions."))
    with pytest.raises(ConfigError, match="mode"):
        TrainConfig(mode="lora")


def test_evaluation_ranges(setup):
    backbone, tok, world = setup
    recall = retrieval_recall(backbone, tok, demo_images(world, "val", 30))
    assert set(recall) == {f"{d}_r@{k}" for d in ("t2i", "i2t") for k in (1, 5, 10)}
    assert all(0 <= v <= 1 for v in recall.values()) and recall["t2i_r@10"] >= recall["t2i_r@1"]
    acc = answer_accuracy(backbone, tok, demo_vqa(world, "val", 5), ANSWERS)
    assert 0 <= acc <= 1


def test_itm_rerank_matches_a_pair_by_pair_reference(setup):
    """ITC top-k re-scored by ITM logit + itc_weight x ITC similarity (the paper's protocol is weight 0, ITM
    alone; weight 1 checks the combination too), against scoring every (text, image) pair one at a time."""
    from uniadapter_serve.adapters.training import visual
    from uniadapter_serve.model.routing import Routing
    from uniadapter_serve.model.tokenizer import clean_text

    backbone, tok, world = setup
    items = demo_images(world, "val", 8)
    got = retrieval_recall(backbone, tok, items, ks=(1, 5), rerank_k=8, itc_weight=1.0)
    assert retrieval_recall(backbone, tok, items, ks=(1,), rerank_k=1, itc_weight=1.0)["itm_t2i_r@1"] == got["t2i_r@1"]
    size = backbone.config.vision_config.image_size
    with torch.inference_mode():
        feats, states = visual(backbone, [it.image for it in items], Routing.none(8), size)
        captions = [clean_text(it.captions[0], 30) for it in items]
        ids, mask = tok.encode(captions, mode="text")
        sims = backbone.text_features(ids, mask) @ feats.T
        mm_ids, mm_mask = tok.encode(captions, mode="multimodal")
        score = torch.stack([torch.stack([
            backbone.itm_logits(mm_ids[t:t + 1], mm_mask[t:t + 1], states[i:i + 1])[0, 1] + sims[t, i]
            for i in range(8)]) for t in range(8)])
    keys = [it.key for it in items]
    for k in (1, 5):
        t2i = np.mean([any(keys[j] == keys[t] for j in score[t].topk(k).indices.tolist()) for t in range(8)])
        i2t = np.mean([any(keys[t] == keys[i] for t in score[:, i].topk(k).indices.tolist()) for i in range(8)])
        assert got[f"itm_t2i_r@{k}"] == pytest.approx(t2i) and got[f"itm_i2t_r@{k}"] == pytest.approx(i2t)


def test_batches_hold_family_members_as_hard_negatives(setup):
    """Grouped items bring a member of their group into the batch (scenes that differ only in layout are
    each other's in-batch negatives); ungrouped data samples plainly and reproducibly."""
    import random

    from uniadapter_serve.adapters.training import GroupSampler

    _, _, world = setup
    data = demo_images(world, "train", 400)
    for per_group in (2, 4):
        batch = GroupSampler(data, per_group)(random.Random(0), 32)
        groups = [it.group for it in batch]
        assert len(batch) == 32 and all(groups.count(g) >= per_group for g in groups)
        assert len({g for g in groups}) >= 32 // per_group - 4
        assert len({id(it.image) for it in batch if it.group == groups[0]}) >= per_group  # other members
    plain = [ImageText(it.image, it.captions, it.key) for it in data]
    first, again = GroupSampler(plain)(random.Random(0), 32), GroupSampler(plain)(random.Random(0), 32)
    assert [it.key for it in first] == [it.key for it in again]
    assert len({it.key for it in first}) > 24  # no pairing: 32 random draws of 400
