"""Position in the demo's pre-training: the layout objective's heads and the linear probe that measures what
the frozen vision tower keeps of where a shape is (issue 26)."""

from __future__ import annotations

import torch

from uniadapter_serve.adapters.datasets import demo_images
from uniadapter_serve.adapters.evaluation import position_probe
from uniadapter_serve.adapters.losses import LayoutHeads
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.loading import load_backbone


def test_pretraining_items_carry_their_layout_left_to_right():
    world = World(seed=0)
    for item in demo_images(world, "train", 40, pretraining=True):
        assert 1 <= len(item.layout) <= 2
        assert [x for x, _ in item.layout] == sorted(x for x, _ in item.layout)
        assert all(0 < x < 1 and 0 < y < 1 for x, y in item.layout)
        assert "left" not in item.captions[0] and "right" not in item.captions[0]  # never named in words


def test_layout_heads_learn_centres_and_patch_places_and_ignore_absent_shapes():
    torch.manual_seed(0)
    heads = LayoutHeads(hidden=16, grid=3)
    codes = torch.randn(9, 16)  # what a position-keeping tower puts in each patch's state
    tokens = torch.cat([torch.randn(4, 1, 16), codes.expand(4, 9, 16) + 0.01 * torch.randn(4, 9, 16)], 1)
    layouts = [((0.2, 0.3),), ((0.1, 0.5), (0.8, 0.4)), ((0.7, 0.7),), ((0.3, 0.2), (0.6, 0.9))]
    first = float(heads.loss(tokens, layouts).detach())
    optimizer = torch.optim.Adam(heads.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        loss = heads.loss(tokens, layouts)
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.01 * first
    with torch.no_grad():
        where = heads.patches(tokens[:, 1:])  # (4, 9, 2): x, y of each patch, row by row
        assert torch.allclose(where[:, 0], torch.tensor([1 / 6, 1 / 6]), atol=0.05)
        assert torch.allclose(where[:, 5], torch.tensor([5 / 6, 1 / 2]), atol=0.05)  # row 1, column 2
        lone = [((0.2, 0.3),), ((0.7, 0.7),)]
        before = float(heads.loss(tokens[:2], lone))
        heads.shapes.weight[2:].add_(5.0)  # the second shape's outputs: no lone-shape image is scored on them
        heads.shapes.bias[2:].add_(5.0)
        assert float(heads.loss(tokens[:2], lone)) == before


def test_the_probe_reads_side_from_the_shipped_backbone_and_not_from_one_that_never_saw_position():
    """The shipped backbone was pre-trained with the layout objective: a linear probe reads a lone shape's side from
    its frozen [CLS] (README: 0.95; chance 0.5). The probe itself can fail: on a freshly initialised demo backbone
    with its position embeddings zeroed, no state depends on where anything is, and it reads at chance."""
    from uniadapter_serve.adapters.demo.pretrain import new_demo_backbone

    probe = position_probe(load_backbone("demo"), World(seed=0), n_train=400, n_test=200)
    assert set(probe) == {"cls", "mean_patches"}
    assert probe["cls"] >= 0.9, probe
    blind = new_demo_backbone(0)
    for name, p in blind.named_parameters():
        if name.startswith("vision_model.embeddings.position_embedding"):
            p.data.zero_()
    probe = position_probe(blind, World(seed=0), n_train=400, n_test=200)
    assert probe["cls"] < 0.7, probe
