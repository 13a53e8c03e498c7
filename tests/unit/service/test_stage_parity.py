"""The serving path equals transformers' BLIP classes: the batcher's stages (the code that answers requests:
tokenising, padding, mixed image/clip batches, per-sample routing) against transformers on the same random
tiny weights and the same tokens, so the parity the model tests show holds for what the service runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering

from uniadapter_serve.model.loading import backbone_from_state_dict
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import AnswerInput, GeneratePlan, MatchInput, TextInput, VisionInput, make_stages
from uniadapter_serve.model.testing import random_transformers_model
from uniadapter_serve.model.tokenizer import CAPTION_WORDS, QUESTION_WORDS, BlipTokenizer, clean_text

TOL = 1e-5
TEXTS = ["A red circle, on the left!", "two blue squares", "is there a cat?"]


@pytest.fixture
def tokenizer(tiny_config):
    return BlipTokenizer.demo(tiny_config.text_config.vocab_size)


def run(stage, payloads):
    return stage(payloads, Routing.none(len(payloads)))


def ids_of(tokenizer, texts, words, mode):
    return tokenizer.encode([clean_text(t, words) for t in texts], mode=mode)


@torch.no_grad()
def test_vision_text_and_match_stages_equal_transformers(tiny_config, tokenizer):
    hf = random_transformers_model(BlipForImageTextRetrieval, tiny_config, seed=31)
    stages = make_stages(backbone_from_state_dict(tiny_config, hf.state_dict()).eval(), tokenizer)
    size = tiny_config.vision_config.image_size
    gen = torch.Generator().manual_seed(5)
    images = [torch.randn(1, 3, size, size, generator=gen) for _ in range(2)]
    clip = torch.randn(3, 3, size, size, generator=gen)
    # one batch mixing two images and a 3-frame clip, as the vision stage serves them
    seen = run(stages["vision"], [VisionInput(images[0]), VisionInput(clip, video=True), VisionInput(images[1])])

    def hf_image(pixels):
        return hf.vision_model(pixel_values=pixels).last_hidden_state

    for out, pixels in ((seen[0], images[0]), (seen[2], images[1])):
        tokens = hf_image(pixels)
        assert (out.states - tokens[0]).abs().max() <= TOL
        assert (out.embedding - F.normalize(hf.vision_proj(tokens[:, 0]), dim=-1)[0]).abs().max() <= TOL
    alone = run(stages["vision"], [VisionInput(images[0]), VisionInput(images[1])])  # images only: another path
    assert all((a.embedding - m.embedding).abs().max() <= TOL for a, m in zip(alone, (seen[0], seen[2]), strict=True))
    frames = hf_image(clip)  # (T, N, D): each frame alone, then UniAdapter's clip embedding (mean frame [CLS])
    assert (seen[1].states - frames.flatten(0, 1)).abs().max() <= TOL
    assert (seen[1].embedding - F.normalize(hf.vision_proj(frames[:, 0].mean(0, keepdim=True)), dim=-1)[0]
            ).abs().max() <= TOL

    # texts of different lengths in one batch ([CLS] first, padded by the stage)
    embedded = run(stages["text"], [TextInput(t) for t in TEXTS])
    ids, mask = ids_of(tokenizer, TEXTS, CAPTION_WORDS, "text")
    assert mask.min() == 0  # the batch really is padded
    ref = F.normalize(hf.text_proj(hf.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]), dim=-1)
    assert (torch.stack(embedded) - ref).abs().max() <= TOL

    # ITM: [ENC] first (transformers takes the ids it is given), each text against the first image
    probs = run(stages["itm"], [MatchInput(t, seen[0].states) for t in TEXTS])
    ids, mask = ids_of(tokenizer, TEXTS, CAPTION_WORDS, "multimodal")
    assert int(ids[0, 0]) == tokenizer.enc_id
    logits = hf(input_ids=ids, attention_mask=mask, pixel_values=images[0].expand(len(TEXTS), -1, -1, -1),
                use_itm_head=True).itm_score
    assert torch.allclose(torch.tensor(probs), logits.softmax(-1)[:, 1], atol=TOL)
    assert logits.abs().max() > 1e-3  # not two near-zero tensors


@torch.no_grad()
def test_answer_stage_generates_what_transformers_generates(tiny_config, tokenizer):
    hf = random_transformers_model(BlipForQuestionAnswering, tiny_config, seed=32)
    stages = make_stages(backbone_from_state_dict(tiny_config, hf.state_dict()).eval(), tokenizer)
    size = tiny_config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(6))
    seen = run(stages["vision"], [VisionInput(pixels[i:i + 1], embed=False) for i in range(2)])
    questions = ["what colour is the circle?", "how many squares are there on the left side"]
    answered = run(stages["answer"], [AnswerInput(q, s.states, GeneratePlan(max_length=5)) for q, s in
                                      zip(questions, seen, strict=True)])
    for i, question in enumerate(questions):  # one at a time: transformers' decoder does not mask question padding
        ids, mask = ids_of(tokenizer, [question], QUESTION_WORDS, "multimodal")
        ref = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels[i:i + 1], num_beams=1,
                          do_sample=False, max_new_tokens=5)
        assert answered[i].texts == [tokenizer.decode(ref[0])]
