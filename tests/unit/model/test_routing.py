"""A batch mixing adapter sets (and bare samples) equals each sample run alone with its own set."""

from __future__ import annotations

import pytest
import torch

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.model.vqa import answer_log_likelihood, generate_answers, rank_answers

TOL = 1e-5


@pytest.fixture
def sets(backbone):
    """Three different sets: a retrieval set with heads, and two VQA sets of different shapes."""
    return [
        random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4), seed=21),
        random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=16, kv_rank=2), seed=22),
        random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=4, kv_rank=0, layers=[1]), seed=23),
    ]


@pytest.fixture
def assignment(sets):
    # 7 samples: every set twice, one bare sample, interleaved
    return [sets[0], None, sets[1], sets[2], sets[0], sets[2], sets[1]]


@torch.no_grad()
def run_all(backbone, batch, routing):
    image = backbone.encode_image(batch.pixel_values, routing)
    q = backbone.encode_multimodal(batch.input_ids, batch.attention_mask, image, routing=routing)
    return {
        "image_itc": backbone.image_features(image, routing),
        "text_itc": backbone.text_features(batch.input_ids, batch.attention_mask, routing),
        "itm": backbone.itm_logits(batch.input_ids, batch.attention_mask, image, routing),
        "answer": answer_log_likelihood(backbone, q, batch.attention_mask, batch.answer_ids, batch.answer_mask,
                                        routing),
    }


def _row(batch, i):
    return type(batch)(*(t[i:i + 1] for t in (batch.pixel_values, batch.input_ids, batch.attention_mask,
                                                batch.answer_ids, batch.answer_mask)))


def test_mixed_batch_equals_each_sample_alone(backbone, assignment):
    batch = random_batch(backbone, len(assignment), seed=31)
    mixed = run_all(backbone, batch, Routing.per_sample(assignment))
    for i, adapter in enumerate(assignment):
        alone = run_all(backbone, _row(batch, i), Routing.single(adapter, 1))
        for key, value in alone.items():
            assert (mixed[key][i:i + 1] - value).abs().max() <= TOL, (key, i)


def test_mixed_batch_differs_per_set(backbone, assignment):
    """Guard: the sets really produce different outputs, so the equality above means routing works."""
    batch = random_batch(backbone, 1, seed=32)
    results = [run_all(backbone, batch, Routing.single(a, 1))["itm"] for a in (None, *assignment[:4])]
    distinct = {tuple(r.flatten().round(decimals=4).tolist()) for r in results}
    assert len(distinct) == 4  # bare + 3 sets


def test_rank_and_generate_in_mixed_batch(backbone, assignment, tiny_config):
    batch = random_batch(backbone, len(assignment), seed=33)
    gen = torch.Generator().manual_seed(0)
    candidates = torch.randint(4, tiny_config.text_config.vocab_size, (9, 3), generator=gen)
    candidates[:, 0] = tiny_config.text_config.bos_token_id
    cmask = torch.ones_like(candidates)
    routing = Routing.per_sample(assignment)
    with torch.no_grad():
        q = backbone.encode_multimodal(batch.input_ids, batch.attention_mask,
                                       backbone.encode_image(batch.pixel_values, routing), routing=routing)
    ranked = rank_answers(backbone, q, batch.attention_mask, candidates, cmask, k=4, routing=routing)
    ids, _ = generate_answers(backbone, q, batch.attention_mask, 2, 3, 0, max_length=4, routing=routing)
    for i, adapter in enumerate(assignment):
        r1 = Routing.single(adapter, 1)
        alone = rank_answers(backbone, q[i:i + 1], batch.attention_mask[i:i + 1], candidates, cmask, 4, r1)
        assert torch.equal(alone.indices, ranked.indices[i:i + 1])
        assert (alone.scores - ranked.scores[i:i + 1]).abs().max() <= TOL
        ids1, _ = generate_answers(backbone, q[i:i + 1], batch.attention_mask[i:i + 1], 2, 3, 0, 4, r1)
        assert torch.equal(ids1[0], ids[i, : ids1.shape[1]])


def test_rank_answers_scores_match_full_scoring(backbone, tiny_config):
    """rank mode's top answer is the best full-likelihood answer among the first-token top-k."""
    batch = random_batch(backbone, 2, seed=34)
    candidates = torch.tensor([[2, 5, 3], [2, 6, 3], [2, 7, 3], [2, 8, 3]])
    cmask = torch.ones_like(candidates)
    with torch.no_grad():
        q = backbone.encode_multimodal(batch.input_ids, batch.attention_mask, backbone.encode_image(batch.pixel_values))
        ranked = rank_answers(backbone, q, batch.attention_mask, candidates, cmask, k=4)
        for i in range(2):
            qi, mi = q[i:i + 1].expand(4, -1, -1), batch.attention_mask[i:i + 1].expand(4, -1)
            full = answer_log_likelihood(backbone, qi, mi, candidates, cmask)
            assert torch.equal(ranked.indices[i], full.argsort(descending=True))
            assert torch.allclose(ranked.scores[i], full.sort(descending=True).values, atol=TOL)


def test_routing_helpers():
    a, b = object(), object()
    r = Routing.per_sample([a, None, b, a])  # type: ignore[list-item]
    assert r.batch_size == 4 and len(r.routes) == 2
    rows = {id(x.adapter): x.index.tolist() for x in r.routes}
    assert rows == {id(a): [0, 3], id(b): [2]}
    rep = r.repeat_interleave(2)
    assert {id(x.adapter): x.index.tolist() for x in rep.routes} == {id(a): [0, 1, 6, 7], id(b): [4, 5]}
    sub = r.select(torch.tensor([3, 2]))
    assert {id(x.adapter): x.index.tolist() for x in sub.routes} == {id(a): [0], id(b): [1]}
    assert Routing.per_sample([a, a]).routes[0].index is None  # one set: no gather at all
    assert Routing.per_sample([None, None]).is_bare
