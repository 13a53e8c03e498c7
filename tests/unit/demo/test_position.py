"""Position in the demo's pre-training: the layout objective's heads, the grounding objective's head, and the
linear probe that measures what the frozen backbone keeps of where a shape is (issue 26)."""

from __future__ import annotations

import math

import pytest
import torch

from uniadapter_serve.adapters.datasets import demo_images
from uniadapter_serve.adapters.evaluation import position_probe
from uniadapter_serve.adapters.losses import GroundingHead, LayoutHeads
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.loading import load_backbone, load_config
from uniadapter_serve.model.tokenizer import load_tokenizer


def test_pretraining_items_carry_their_layout_left_to_right():
    world = World(seed=0)
    for item in demo_images(world, "train", 40, pretraining=True):
        assert 1 <= len(item.layout) <= 2
        assert [x for x, _ in item.layout] == sorted(x for x, _ in item.layout)
        assert all(0 < x < 1 and 0 < y < 1 for x, y in item.layout)
        assert "left" not in item.captions[0] and "right" not in item.captions[0]  # never named in words


def test_pretraining_items_name_each_shape_with_its_centre():
    world = World(seed=0)
    items = demo_images(world, "train", 40, pretraining=True)
    for i, item in enumerate(items):
        scene = world.scene(i)
        assert item.regions == tuple((s.phrase(), s.x, s.y) for s in scene.shapes)
        assert sorted((x, y) for _, x, y in item.regions) == list(item.layout)
        for phrase, _, _ in item.regions:
            assert phrase in item.captions[0]  # the phrase the caption already says: no word of place


def test_the_grounding_heads_start_at_chance_and_learn_which_cell_a_named_shape_is_in():
    torch.manual_seed(0)
    head = GroundingHead(hidden=16, grid=4)
    with torch.no_grad():
        for linear in (head.encoder, head.decoder):
            linear.weight.zero_()
            linear.bias.zero_()
    centres = torch.tensor([[0.1, 0.9], [0.6, 0.3], [0.9, 0.55], [0.3, 0.05]])
    assert head.cells(centres).tolist() == [[0, 3], [2, 1], [3, 2], [1, 0]]
    question, first = torch.randn(4, 16), torch.randn(4, 16)  # the phrase's [CLS] state, the decoder's first state
    assert float(head.loss(question, first, centres).detach()) == pytest.approx(2 * math.log(4), abs=1e-6)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        loss = head.loss(question, first, centres)
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05
    with torch.no_grad():
        for linear, state in ((head.encoder, question), (head.decoder, first)):
            assert linear(state).view(4, 2, 4).argmax(-1).tolist() == head.cells(centres).tolist()
        assert float(head.loss(first, question, centres)) > 1.0  # each head reads its own state


def test_the_grounding_objective_trains_the_question_path():
    """Its gradient reaches both cross-attentions a VQA answer goes through (the question's to the image, the
    decoder's to the question), not only its heads: one step with it moves every layer's cross-attention of both
    towers elsewhere than the same step without it (same batch, same ITM negatives)."""
    from uniadapter_serve.adapters.datasets import ImageText
    from uniadapter_serve.adapters.demo.pretrain import pretrain

    world = World(seed=0)
    config = load_config("blip-demo")
    tok = load_tokenizer("demo", config)
    data = demo_images(world, "train", 8, pretraining=True)
    grounded, _ = pretrain(data, tok, steps=1, batch_size=4, grounding_weight=1.0, progress=False)
    plain, _ = pretrain(data, tok, steps=1, batch_size=4, progress=False)
    g, p = dict(grounded.named_parameters()), dict(plain.named_parameters())
    for tower in ("text_encoder", "text_decoder.bert"):
        for layer in range(config.text_config.num_hidden_layers):
            name = f"{tower}.encoder.layer.{layer}.crossattention.self.value.weight"
            assert not torch.equal(g[name], p[name]), name
    with pytest.raises(ValueError, match="regions"):
        pretrain([ImageText(it.image, it.captions, it.key) for it in data], tok, steps=1, batch_size=4,
                 grounding_weight=1.0, progress=False)


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


def test_family_draws_put_scenes_that_differ_only_in_layout_in_one_batch():
    """pretrain(group_draw=g) draws its batches with GroupSampler: each drawn scene brings g - 1 others of its
    family, and with ordered captions those are ITC/ITM negatives whenever the order of the shapes differs. group_draw
    1 keeps the plain uniform batch (the same random draws as before, so earlier builds reproduce)."""
    import random

    from uniadapter_serve.adapters.training import GroupSampler

    world = World(seed=0)
    data = demo_images(world, "train", 64, pretraining=True, ordered=True)
    idx = GroupSampler(data, 4).indices(random.Random(3), 16)
    assert len(idx) == 16
    for start in range(0, 16, 4):  # each draw, then three of its family, none repeated
        run = idx[start:start + 4]
        assert len({data[i].group for i in run}) == 1 and len(set(run)) == 4
    families: dict[str, set[str]] = {}
    for it in data:
        if len(it.layout) == 2:
            families.setdefault(it.group, set()).add(it.captions[0])
    assert any(len(captions) == 2 for captions in families.values())  # order-swapped captions within a family
    uniform = random.Random(3)
    assert GroupSampler(data, 1).indices(random.Random(3), 16) == [uniform.randrange(len(data)) for _ in range(16)]
