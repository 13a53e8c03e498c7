"""The bare backbone equals transformers' BLIP classes on the same (random, tiny) weights."""

from __future__ import annotations

import pytest
import torch
from transformers import BlipConfig, BlipForImageTextRetrieval, BlipForQuestionAnswering

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.loading import backbone_from_state_dict, load_backbone
from uniadapter_serve.model.testing import random_answer_list, random_batch, random_transformers_model
from uniadapter_serve.model.vqa import answer_log_likelihood, beam_search_answers, generate_answers, rank_answers

TOL = 1e-5


@pytest.fixture
def hf_itm(tiny_config: BlipConfig) -> BlipForImageTextRetrieval:
    return random_transformers_model(BlipForImageTextRetrieval, tiny_config, seed=11)


@pytest.fixture
def hf_vqa(tiny_config: BlipConfig) -> BlipForQuestionAnswering:
    return random_transformers_model(BlipForQuestionAnswering, tiny_config, seed=12)


@pytest.fixture(params=["state_dict", "folder"])
def ours_itm(request, hf_itm, tiny_config, tmp_path) -> BlipBackbone:
    if request.param == "state_dict":
        return backbone_from_state_dict(tiny_config, hf_itm.state_dict()).eval()
    hf_itm.save_pretrained(tmp_path)
    return load_backbone(tmp_path)


@pytest.fixture(params=["state_dict", "folder"])
def ours_vqa(request, hf_vqa, tiny_config, tmp_path) -> BlipBackbone:
    if request.param == "state_dict":
        return backbone_from_state_dict(tiny_config, hf_vqa.state_dict()).eval()
    hf_vqa.save_pretrained(tmp_path)
    return load_backbone(tmp_path)


@torch.no_grad()
def test_itc_embeddings_match_transformers(hf_itm, ours_itm):
    b = random_batch(ours_itm, 4, seed=3)
    vision = hf_itm.vision_model(pixel_values=b.pixel_values).last_hidden_state
    ref_img = torch.nn.functional.normalize(hf_itm.vision_proj(vision[:, 0]), dim=-1)
    text = hf_itm.text_encoder(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state
    ref_txt = torch.nn.functional.normalize(hf_itm.text_proj(text[:, 0]), dim=-1)

    img = ours_itm.image_features(ours_itm.encode_image(b.pixel_values))
    txt = ours_itm.text_features(b.input_ids, b.attention_mask)
    assert (img - ref_img).abs().max() <= TOL
    assert (txt - ref_txt).abs().max() <= TOL
    # and the similarity matrix of the model's own ITC path
    ref_sim = hf_itm(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask,
                     use_itm_head=False).itm_score
    assert (img @ txt.T - ref_sim).abs().max() <= TOL


@torch.no_grad()
def test_itm_logits_match_transformers(hf_itm, ours_itm):
    b = random_batch(ours_itm, 5, seed=4)
    ref = hf_itm(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask,
                 use_itm_head=True).itm_score
    ours = ours_itm.itm_logits(b.input_ids, b.attention_mask, ours_itm.encode_image(b.pixel_values))
    assert ours.shape == (5, 2)
    assert (ours - ref).abs().max() <= TOL
    assert ref.abs().max() > 1e-3  # the comparison is not between two near-zero tensors


@torch.no_grad()
def test_vqa_answer_scores_match_transformers(hf_vqa, ours_vqa):
    b = random_batch(ours_vqa, 4, seed=5)
    image = hf_vqa.vision_model(pixel_values=b.pixel_values).last_hidden_state
    q_ref = hf_vqa.text_encoder(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                encoder_hidden_states=image).last_hidden_state
    logits_ref = hf_vqa.text_decoder(input_ids=b.answer_ids, attention_mask=b.answer_mask,
                                     encoder_hidden_states=q_ref, encoder_attention_mask=b.attention_mask).logits
    logp = torch.log_softmax(logits_ref[:, :-1], dim=-1).gather(-1, b.answer_ids[:, 1:, None]).squeeze(-1)
    score_ref = (logp * b.answer_mask[:, 1:]).sum(1)

    q = ours_vqa.encode_multimodal(b.input_ids, b.attention_mask, ours_vqa.encode_image(b.pixel_values))
    assert (q - q_ref).abs().max() <= TOL
    # transformers' cross-attention drops encoder_attention_mask (BlipTextAttention never passes it
    # on), so its decoder attends to padded question tokens; BLIP masks them. Compare with every
    # question token attended, then check our masking separately below.
    qmask = torch.ones(q.shape[:2], dtype=torch.long)
    logits = ours_vqa.decoder_logits(b.answer_ids, b.answer_mask, q, qmask)
    valid = b.answer_mask.bool()
    assert (logits[valid] - logits_ref[valid]).abs().max() <= TOL
    score = answer_log_likelihood(ours_vqa, q, qmask, b.answer_ids, b.answer_mask)
    assert (score - score_ref).abs().max() <= TOL


@torch.no_grad()
def test_answer_scores_ignore_question_padding(ours_vqa):
    """Appending [PAD] to a question changes nothing (BLIP's masking, which transformers lacks)."""
    b = random_batch(ours_vqa, 1, seed=7, text_len=5)
    image = ours_vqa.encode_image(b.pixel_values)
    padded_ids = torch.cat([b.input_ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([b.attention_mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    scores = []
    for ids, mask in ((b.input_ids, b.attention_mask), (padded_ids, padded_mask)):
        q = ours_vqa.encode_multimodal(ids, mask, image)
        scores.append(answer_log_likelihood(ours_vqa, q, mask, b.answer_ids, b.answer_mask))
    assert (scores[0] - scores[1]).abs().max() <= TOL


@torch.no_grad()
def test_vqa_greedy_generation_matches_transformers(hf_vqa, ours_vqa, tiny_config):
    b = random_batch(ours_vqa, 3, seed=6)
    tc = tiny_config.text_config
    ref = hf_vqa.generate(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask,
                          num_beams=1, do_sample=False, max_new_tokens=6, min_new_tokens=6)
    q = ours_vqa.encode_multimodal(b.input_ids, b.attention_mask, ours_vqa.encode_image(b.pixel_values))
    qmask = torch.ones(q.shape[:2], dtype=torch.long)  # transformers' generate attends to every question token
    ids, _ = generate_answers(ours_vqa, q, qmask, tc.bos_token_id, eos_token_id=-1, pad_token_id=tc.pad_token_id,
                              max_length=6)
    assert torch.equal(ids, ref)


@pytest.mark.parametrize("eos", ["sep", "frequent"])
@torch.no_grad()
def test_vqa_beam_search_matches_transformers(hf_vqa, ours_vqa, tiny_config, eos):
    """3 beams, as BLIP and UniAdapter answer: the same hypotheses as transformers' generate(num_beams=3)."""
    b = random_batch(ours_vqa, 4, seed=8)
    tc = tiny_config.text_config
    q = ours_vqa.encode_multimodal(b.input_ids, b.attention_mask, ours_vqa.encode_image(b.pixel_values))
    qmask = torch.ones(q.shape[:2], dtype=torch.long)
    if eos == "frequent":  # a token the decoder likes, so that beams end early and at different lengths
        greedy, _ = generate_answers(ours_vqa, q, qmask, tc.bos_token_id, -1, tc.pad_token_id, max_length=4)
        eos_id = int(greedy[:, 1:].flatten().mode().values)
        hf_vqa.config.text_config.sep_token_id = eos_id
    else:
        eos_id = tc.sep_token_id
    ref = hf_vqa.generate(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask,
                          num_beams=3, do_sample=False, max_new_tokens=7)
    out = beam_search_answers(ours_vqa, q, qmask, tc.bos_token_id, eos_id, tc.pad_token_id, num_beams=3,
                              max_length=7)
    assert out.ids.shape[:2] == (4, 3)
    ended = 0
    for row in range(4):
        ours, theirs = out.ids[row, 0].tolist(), ref[row].tolist()
        if eos_id in theirs:  # transformers pads after EOS with EOS; compare up to it
            theirs = theirs[: theirs.index(eos_id) + 1]
            ended += 1
        assert ours[: len(theirs)] == theirs
        assert all(t == tc.pad_token_id for t in ours[len(theirs):])
    if eos == "frequent":
        assert ended > 0
    # hypotheses best first, scored by their own log-likelihood
    lengths = (out.ids[:, :, 1:] != tc.pad_token_id).sum(-1).clamp(min=1).float()
    assert (out.scores[:, :-1] / lengths[:, :-1] >= out.scores[:, 1:] / lengths[:, 1:] - 1e-5).all()
    mask = (out.ids != tc.pad_token_id).long()
    for row in range(4):
        ll = answer_log_likelihood(ours_vqa, q[row:row + 1].expand(3, -1, -1), qmask[row:row + 1].expand(3, -1),
                                   out.ids[row], mask[row])
        assert (ll - out.scores[row]).abs().max() <= 1e-4


@torch.no_grad()
def test_vqa_blip_rank_score_matches_transformers_smoothed_loss(hf_vqa, ours_vqa, tiny_config):
    """score="blip" is BLIP's rank score: minus the decoder's label-smoothed (0.1) loss summed per answer,
    as transformers' BlipTextLMHeadModel computes it with reduction="none" (pads ignored)."""
    b = random_batch(ours_vqa, 2, seed=9)
    q = ours_vqa.encode_multimodal(b.input_ids, b.attention_mask, ours_vqa.encode_image(b.pixel_values))
    qmask = torch.ones(q.shape[:2], dtype=torch.long)
    C = 6
    cand, cmask = random_answer_list(tiny_config, C, seed=10)  # answers of 1 to 3 tokens, SEP, padding
    ranked = rank_answers(ours_vqa, q, qmask, cand, cmask, C, score="blip")
    likelihood = rank_answers(ours_vqa, q, qmask, cand, cmask, C)
    hf_vqa.text_decoder.label_smoothing = 0.1
    for row in range(2):
        ids, mask = cand[ranked.indices[row]], cmask[ranked.indices[row]]
        out = hf_vqa.text_decoder(input_ids=ids, attention_mask=mask,
                                  encoder_hidden_states=q[row:row + 1].expand(C, -1, -1),
                                  encoder_attention_mask=qmask[row:row + 1].expand(C, -1),
                                  labels=ids.masked_fill(mask == 0, -100), reduction="none")
        assert (ranked.scores[row] + out.loss).abs().max() <= 1e-4
    assert (ranked.scores[:, :-1] >= ranked.scores[:, 1:]).all()
    assert not torch.allclose(ranked.scores.sort(dim=1).values, likelihood.scores.sort(dim=1).values)
