"""The answer stage's rank mode: k candidates survive the first-token pruning whatever top_k is, and a job's
answers never depend on the jobs it is batched with (other k, other score, generate jobs)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_answer_list, random_batch
from uniadapter_serve.model.vqa import answer_log_likelihood
from uniadapter_serve.service.stages import AnswerInput, make_handlers

BOS, SEP, PAD = 2, 3, 0
C = 30


@pytest.fixture
def setup(backbone, tiny_config):
    """The answer handler, two questions' (ids, mask, vision states) and a list of C candidate answers."""
    handler = make_handlers(backbone, bos_id=BOS, sep_id=SEP, pad_id=PAD)["answer"]
    batch = random_batch(backbone, 2, seed=21, text_len=7)
    with torch.no_grad():
        states = backbone.encode_image(batch.pixel_values)
    cand, mask = random_answer_list(tiny_config, C, seed=22)
    # as the tokenizer gives one question: no padding (the stage masks the padding it adds when batching)
    questions = [(batch.input_ids[i], torch.ones_like(batch.input_ids[i]), states[i:i + 1]) for i in range(2)]
    return handler, questions, (cand, mask)


def run(handler, inputs):
    return handler([SimpleNamespace(payload=x) for x in inputs], Routing.none(len(inputs)))


def rank(question, candidates, top_k, rank_k, score="likelihood"):
    ids, mask, states = question
    return AnswerInput(ids, mask, states, mode="rank", top_k=top_k, candidates=candidates, rank_k=rank_k,
                       rank_score=score)


@torch.no_grad()
def full_scores(backbone, question, candidates):
    """Every candidate's log-likelihood, no pruning."""
    ids, mask, states = question
    q = backbone.encode_multimodal(ids[None], mask[None], states)
    qmask = mask.new_ones(q.shape[:2])
    first = F.log_softmax(backbone.decoder_logits(torch.full((1, 1), BOS), None, q, qmask)[0, 0], -1)
    full = answer_log_likelihood(backbone, q.expand(C, -1, -1), qmask.expand(C, -1), *candidates)
    return full, first.index_select(0, candidates[0][:, 1])


def test_rank_k_candidates_are_scored_whatever_top_k(backbone, setup):
    handler, questions, candidates = setup
    for question in questions:
        full, first = full_scores(backbone, question, candidates)
        out = run(handler, [rank(question, candidates, top_k=3, rank_k=C)])[0]
        assert out.indices == full.topk(3).indices.tolist()
        assert torch.allclose(torch.tensor(out.scores), full.topk(3).values, atol=1e-4)
        pruned = run(handler, [rank(question, candidates, top_k=1, rank_k=1)])[0]
        assert pruned.indices == [int(first.argmax())]  # k = 1: the first token alone decides


def test_a_rank_job_answers_the_same_in_any_batch(setup):
    handler, questions, candidates = setup
    q0, q1 = questions
    gen = AnswerInput(q1[0], q1[1], q1[2], mode="generate", top_k=1, max_length=4)
    jobs = [rank(q0, candidates, 3, 4), rank(q0, candidates, 3, C), rank(q1, candidates, 5, C, "blip"),
            rank(q1, candidates, 5, C), gen]
    together = run(handler, jobs)
    for job, mixed in zip(jobs, together, strict=True):
        alone = run(handler, [job])[0]
        assert mixed.indices == alone.indices
        assert torch.allclose(torch.tensor(mixed.scores), torch.tensor(alone.scores), atol=1e-4)
    assert together[2].scores != together[3].scores  # BLIP's score is not the log-likelihood


def test_a_vqa_checkpoint_without_itc_heads_answers(tiny_config):
    """A VQA checkpoint (transformers' BlipForQuestionAnswering, BLIP's model_vqa) has no projection heads:
    answering asks the vision stage for states only, in the same batch as a job that wants the embedding
    (which fails alone, naming the missing head)."""
    from transformers import BlipForQuestionAnswering

    from uniadapter_serve.model.loading import backbone_from_state_dict
    from uniadapter_serve.service.stages import VisionInput

    torch.manual_seed(0)
    vqa = backbone_from_state_dict(tiny_config, BlipForQuestionAnswering(tiny_config).state_dict()).eval()
    assert vqa.vision_proj is None
    handlers = make_handlers(vqa, bos_id=BOS, sep_id=SEP, pad_id=PAD)
    pixels = torch.randn(1, 3, tiny_config.vision_config.image_size, tiny_config.vision_config.image_size)
    with torch.inference_mode():
        (out,) = handlers["vision"]([SimpleNamespace(payload=VisionInput(pixels, embed=False))], Routing.none(1))
        assert out.embedding is None and out.states.shape[0] > 1
        ids = torch.tensor([BOS + 1, 7, 8, 9])
        (answer,) = run(handlers["answer"], [AnswerInput(ids, torch.ones_like(ids), out.states,
                                                         mode="generate", top_k=1, max_length=3)])
        assert answer.tokens and answer.tokens[0][0] == BOS
        with pytest.raises(Exception, match="vision_proj"):
            handlers["vision"]([SimpleNamespace(payload=VisionInput(pixels, embed=False)),
                                SimpleNamespace(payload=VisionInput(pixels))], Routing.none(2))
