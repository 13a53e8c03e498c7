"""The answer stage's rank mode: k candidates survive the first-token pruning whatever top_k is, and a job's
answers never depend on the jobs it is batched with (other k, other score, generate jobs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import AnswerInput, GeneratePlan, RankPlan, make_stages
from uniadapter_serve.model.testing import random_answer_list, random_batch
from uniadapter_serve.model.tokenizer import QUESTION_WORDS, BlipTokenizer, clean_text
from uniadapter_serve.model.vqa import answer_log_likelihood

BOS, SEP, PAD = 2, 3, 0
C = 30


@pytest.fixture
def tokenizer(tiny_config):
    return BlipTokenizer.demo(tiny_config.text_config.vocab_size)


@pytest.fixture
def setup(backbone, tiny_config, tokenizer):
    """The answer stage, two questions (text, vision states) and a list of C candidate answers."""
    stage = make_stages(backbone, tokenizer)["answer"]
    batch = random_batch(backbone, 2, seed=21, text_len=7)
    with torch.no_grad():
        states = backbone.encode_image(batch.pixel_values)
    cand, mask = random_answer_list(tiny_config, C, seed=22)
    questions = [("is there a red circle?", states[0:1]), ("what colour is the big square", states[1:2])]
    return stage, questions, (cand, mask)


def run(stage, inputs):
    return stage(inputs, Routing.none(len(inputs)))


def rank(question, candidates, top_k, rank_k, score="likelihood"):
    text, states = question
    return AnswerInput(text, states[0], RankPlan(candidates, k=rank_k, top_k=top_k, score=score))


@torch.no_grad()
def full_scores(backbone, tokenizer, question, candidates):
    """Every candidate's log-likelihood, no pruning."""
    text, states = question
    ids, mask = tokenizer.encode([clean_text(text, QUESTION_WORDS)], mode="multimodal")
    ids, mask = ids[0], mask[0]
    q = backbone.encode_multimodal(ids[None], mask[None], states)
    qmask = mask.new_ones(q.shape[:2])
    first = F.log_softmax(backbone.decoder_logits(torch.full((1, 1), BOS), None, q, qmask)[0, 0], -1)
    full = answer_log_likelihood(backbone, q.expand(C, -1, -1), qmask.expand(C, -1), *candidates)
    return full, first.index_select(0, candidates[0][:, 1])


def test_rank_k_candidates_are_scored_whatever_top_k(backbone, tokenizer, setup):
    handler, questions, candidates = setup
    for question in questions:
        full, first = full_scores(backbone, tokenizer, question, candidates)
        out = run(handler, [rank(question, candidates, top_k=3, rank_k=C)])[0]
        assert out.indices == full.topk(3).indices.tolist()
        assert torch.allclose(torch.tensor(out.scores), full.topk(3).values, atol=1e-4)
        pruned = run(handler, [rank(question, candidates, top_k=1, rank_k=1)])[0]
        assert pruned.indices == [int(first.argmax())]  # k = 1: the first token alone decides


def test_a_rank_job_answers_the_same_in_any_batch(setup):
    handler, questions, candidates = setup
    q0, q1 = questions
    gen = AnswerInput(q1[0], q1[1][0], GeneratePlan(max_length=4))
    jobs = [rank(q0, candidates, 3, 4), rank(q0, candidates, 3, C), rank(q1, candidates, 5, C, "blip"),
            rank(q1, candidates, 5, C), gen]
    together = run(handler, jobs)
    for job, mixed in zip(jobs, together, strict=True):
        alone = run(handler, [job])[0]
        assert mixed.indices == alone.indices
        assert torch.allclose(torch.tensor(mixed.scores), torch.tensor(alone.scores), atol=1e-4)
    assert together[2].scores != together[3].scores  # BLIP's score is not the log-likelihood


def test_a_vqa_checkpoint_without_itc_heads_answers(tiny_config, tokenizer):
    """A VQA checkpoint (transformers' BlipForQuestionAnswering, BLIP's model_vqa) has no projection heads:
    answering asks the vision stage for states only, in the same batch as a job that wants the embedding
    (which fails alone, naming the missing head)."""
    from transformers import BlipForQuestionAnswering

    from uniadapter_serve.model.loading import backbone_from_state_dict
    from uniadapter_serve.model.stages import VisionInput

    torch.manual_seed(0)
    vqa = backbone_from_state_dict(tiny_config, BlipForQuestionAnswering(tiny_config).state_dict()).eval()
    assert vqa.vision_proj is None
    handlers = make_stages(vqa, tokenizer)
    pixels = torch.randn(1, 3, tiny_config.vision_config.image_size, tiny_config.vision_config.image_size)
    with torch.inference_mode():
        (out,) = handlers["vision"]([VisionInput(pixels, embed=False)], Routing.none(1))
        assert out.embedding is None and out.states.shape[0] > 1
        (answer,) = run(handlers["answer"], [AnswerInput("what is it", out.states, GeneratePlan(max_length=3))])
        assert answer.texts is not None and len(answer.texts) == 1 and answer.indices is None
        with pytest.raises(Exception, match="vision_proj"):
            handlers["vision"]([VisionInput(pixels, embed=False),
                                VisionInput(pixels)], Routing.none(2))
