"""Incremental decoding (KV cache, shared question K/V, beam search) equals re-running the decoder from
scratch, in batches mixing adapter sets, with padded questions and answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_answer_list, random_batch
from uniadapter_serve.model.text import DecoderCache, TextSelfAttention
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.model.vqa import (
    BLIP_LABEL_SMOOTHING,
    _score_prefix_tree,
    answer_log_likelihood,
    beam_search_answers,
    generate_answers,
    rank_answers,
)

TOL = 1e-5
BOS, EOS, PAD = 2, 3, 0


@pytest.fixture
def mixed(backbone):
    sets = [random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=16, kv_rank=4), seed=41),
            random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=2, layers=[0]), seed=42)]
    return [sets[0], None, sets[1], sets[0], sets[1], None]


@pytest.fixture
def question(backbone, mixed):
    """(states, mask, routing) of 6 questions of different lengths, each with its own set (or none)."""
    batch = random_batch(backbone, len(mixed), seed=43, text_len=9)
    mask = batch.attention_mask.clone()
    for i in range(len(mixed)):
        mask[i, 9 - i:] = 0  # question i carries i padding tokens
    routing = Routing.per_sample(mixed)
    with torch.no_grad():
        q = backbone.encode_multimodal(batch.input_ids, mask, backbone.encode_image(batch.pixel_values, routing),
                                       routing=routing)
    return q, mask, routing


@torch.no_grad()
def uncached_greedy(backbone, q, qmask, routing, max_length, eos_id=EOS):
    """The decoding this project did before the cache: the whole prefix through the decoder at every step."""
    ids = torch.full((q.shape[0], 1), BOS)
    done = torch.zeros(q.shape[0], dtype=torch.bool)
    total = torch.zeros(q.shape[0])
    for _ in range(max_length):
        logp = F.log_softmax(backbone.decoder_logits(ids, None, q, qmask, routing)[:, -1].float(), dim=-1)
        best, nxt = logp.max(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        total += torch.where(done, torch.zeros_like(best), best)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if done.all():
            break
    return ids, total


@pytest.mark.parametrize("eos", [EOS, "frequent"])
def test_cached_greedy_is_token_for_token_the_uncached_one(backbone, question, eos):
    q, qmask, routing = question
    eos_id = EOS
    if eos == "frequent":  # an EOS that some rows produce early, so rows finish at different steps
        probe, _ = uncached_greedy(backbone, q, qmask, routing, 3)
        eos_id = int(probe[:, 1:].flatten().mode().values)
    ref_ids, ref_scores = uncached_greedy(backbone, q, qmask, routing, 8, eos_id)
    ids, scores = generate_answers(backbone, q, qmask, BOS, eos_id, PAD, 8, routing)
    assert torch.equal(ids, ref_ids)
    assert (scores - ref_scores).abs().max() <= TOL
    if eos == "frequent":
        assert (ids == eos_id).any(dim=1).any() and ids.shape[1] > 2


def test_rank_shares_question_kv_and_scores_as_the_copying_path(backbone, question, tiny_config):
    """k candidates per question: the question K/V are broadcast, not repeated; the scores are the ones the
    repeat-the-states path gave, candidates of different lengths included."""
    q, qmask, routing = question
    cand, cmask = random_answer_list(tiny_config, 12, seed=5)
    k = 7
    ranked = rank_answers(backbone, q, qmask, cand, cmask, k, routing)
    B = q.shape[0]
    with torch.no_grad():  # the old path: states repeated k times, every candidate scored against them
        first = F.log_softmax(backbone.decoder_logits(torch.full((B, 1), BOS), None, q, qmask, routing)[:, 0], -1)
        top = first.index_select(1, cand[:, 1]).topk(k, dim=1).indices
        full = answer_log_likelihood(backbone, q.repeat_interleave(k, 0), qmask.repeat_interleave(k, 0),
                                     cand[top.flatten()], cmask[top.flatten()], routing.repeat_interleave(k)).view(B, k)
    order = full.argsort(dim=1, descending=True)
    assert torch.equal(ranked.indices, top.gather(1, order))
    assert (ranked.scores - full.gather(1, order)).abs().max() <= TOL


def test_grouped_attention_equals_copied_keys():
    attn = TextSelfAttention.__new__(TextSelfAttention)
    torch.nn.Module.__init__(attn)
    attn.num_heads, attn.dropout = 2, 0.0
    attn.query = torch.nn.Linear(8, 8)
    x = torch.randn(6, 3, 8)
    k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    grouped = attn.attend(x, k, v, mask)
    copied = attn.attend(x, k.repeat_interleave(3, 0), v.repeat_interleave(3, 0), mask.repeat_interleave(3, 0))
    assert (grouped - copied).abs().max() <= 1e-6


def test_beam_search_in_a_mixed_batch_equals_each_question_alone(backbone, question):
    q, qmask, routing = question
    beams = beam_search_answers(backbone, q, qmask, BOS, EOS, PAD, num_beams=3, max_length=5, routing=routing)
    for i in range(q.shape[0]):
        alone = beam_search_answers(backbone, q[i:i + 1], qmask[i:i + 1], BOS, EOS, PAD, 3, 5, routing.select(
            torch.tensor([i])))
        width = alone.ids.shape[2]
        assert torch.equal(alone.ids[0], beams.ids[i, :, :width])
        assert (beams.ids[i, :, width:] == PAD).all()
        assert (alone.scores[0] - beams.scores[i]).abs().max() <= TOL


def test_one_beam_is_greedy(backbone, question):
    q, qmask, routing = question
    ids, scores = generate_answers(backbone, q, qmask, BOS, EOS, PAD, 6, routing)
    beam = beam_search_answers(backbone, q, qmask, BOS, EOS, PAD, num_beams=1, max_length=6, routing=routing)
    assert torch.equal(beam.ids[:, 0], ids)
    assert (beam.scores[:, 0] - scores).abs().max() <= TOL


@pytest.mark.parametrize("score", ["likelihood", "blip"])
def test_prefix_tree_scores_ragged_candidates_as_the_full_pass(backbone, question, score):
    """The prefix tree, with questions whose candidates end at different depths (one question's all end
    after one token, while others' share prefixes and go on): each candidate's score is the one a full pass
    over its own tokens gives."""
    q, qmask, routing = question
    B, k = q.shape[0], 4
    rows = []
    for b in range(B):
        if b == 1:  # every answer one token long
            rows += [[BOS, 10 + c, EOS, PAD, PAD] for c in range(k)]
        else:  # shared prefixes of different depths
            rows += [[BOS, 7, EOS, PAD, PAD], [BOS, 7, 8, EOS, PAD], [BOS, 7, 8, 9, EOS], [BOS, 11 + b, 8, 9, EOS]]
    ids = torch.tensor(rows)
    mask = (ids != PAD).long()
    with torch.no_grad():
        cache = DecoderCache()
        first = backbone.decoder_logits(ids[::k, :1], None, q, qmask, routing, cache)[:, 0]
        got = _score_prefix_tree(backbone, cache, F.log_softmax(first.float(), -1), routing, ids, mask, score)
        logits = backbone.decoder_logits(ids, mask, q.repeat_interleave(k, 0), qmask.repeat_interleave(k, 0),
                                         routing.repeat_interleave(k))
    logp = F.log_softmax(logits[:, :-1].float(), -1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    if score == "blip":
        eps = BLIP_LABEL_SMOOTHING
        picked = (1 - eps) * picked + eps * logp.mean(-1)
    want = (picked * mask[:, 1:]).sum(1)
    assert (got - want).abs().max() <= 1e-4
