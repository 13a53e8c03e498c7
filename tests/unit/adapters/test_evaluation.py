"""Retrieval recall as BLIP and UniAdapter evaluate it (every caption, ITM alone over the ITC top-k, both
ways) and VQA accuracy with the official metric: exact figures on a stub model whose ITC and ITM scores are
tables, and a pair-by-pair reference on the tiny random backbone."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from uniadapter_serve.adapters import evaluation
from uniadapter_serve.adapters.datasets import QA, ImageText
from uniadapter_serve.adapters.evaluation import answer_accuracy, retrieval_recall
from uniadapter_serve.adapters.training import visual
from uniadapter_serve.errors import InputError
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text

# 3 images, 2 captions each: caption t belongs to image t // 2
ITC = torch.tensor([[0.9, 0.5, 0.1],    # cap0 -> img0 first
                    [0.4, 0.95, 0.1],   # cap1 -> img1 first: wrong by ITC
                    [0.2, 0.9, 0.3],    # cap2 -> img1
                    [0.1, 0.7, 0.6],    # cap3 -> img1, img2 close behind
                    [0.3, 0.1, 0.8],    # cap4 -> img2
                    [0.8, 0.1, 0.2]])   # cap5 -> img0 first: wrong by ITC
ITM = torch.tensor([[3.0, 0.0, 0.0],
                    [5.0, 1.0, 9.0],    # img2 would win cap1 by ITM, but it is outside cap1's ITC top-2
                    [0.0, 3.0, 0.0],
                    [0.0, 1.0, 1.5],    # ITM alone puts img2 first for cap3: wrong
                    [0.0, 0.0, 3.0],
                    [1.0, 0.0, 4.0]])


class StubTokenizer:
    """Each caption is one token: its row in the score tables."""

    def __init__(self, captions: list[str]) -> None:
        self.row = {c: i for i, c in enumerate(captions)}

    def encode(self, texts, *, mode="text", max_length=None):
        ids = torch.tensor([[self.row.get(t, 0)] for t in texts])
        return ids, torch.ones_like(ids)

    def encode_answers(self, answers):
        return self.encode(answers)


class StubBackbone:
    """ITC similarity and ITM match logit read from tables; records every (caption, image) ITM scores."""

    def __init__(self, itc: torch.Tensor, itm: torch.Tensor) -> None:
        self.itc, self.itm = itc, itm
        self.config = SimpleNamespace(vision_config=SimpleNamespace(image_size=4))
        self.device = torch.device("cpu")
        self.scored: list[tuple[int, int]] = []

    def text_features(self, ids, mask, routing=None):
        return self.itc[ids[:, 0]]  # (B, I): against one-hot image features, the similarity row

    def itm_logits(self, ids, mask, states, routing=None):
        t, i = ids[:, 0], states[:, 0, 0].long()
        self.scored += list(zip(t.tolist(), i.tolist(), strict=True))
        return torch.stack([torch.zeros(len(t)), self.itm[t, i]], dim=1)

    def encode_multimodal(self, ids, mask, states, *args, **kwargs):
        return torch.zeros(ids.shape[0], 1, 1)


def stub_visual(model, media, routing, size, num_frames=8):
    """Images are named 'img<i>': one-hot features, and states that carry the index."""
    idx = torch.tensor([int(m[3:]) for m in media])
    return torch.eye(model.itc.shape[1])[idx], idx.float().view(-1, 1, 1)


@pytest.fixture
def stub(monkeypatch):
    monkeypatch.setattr(evaluation, "visual", stub_visual)
    captions = [f"cap{t}" for t in range(6)]
    items = [ImageText(f"img{i}", captions[2 * i:2 * i + 2], key=f"img{i}") for i in range(3)]
    return StubBackbone(ITC, ITM), StubTokenizer(captions), items


def test_every_caption_is_a_query_and_both_directions_are_reported(stub):
    backbone, tok, items = stub
    got = retrieval_recall(backbone, tok, items, ks=(1, 2))  # type: ignore[arg-type]
    assert got == pytest.approx({"t2i_r@1": 4 / 6,  # cap1 and cap5 miss at 1 (with one caption per image: 3/3)
                                 "t2i_r@2": 1.0,
                                 "i2t_r@1": 2 / 3,  # img1's first caption is cap1, img0's
                                 "i2t_r@2": 1.0})
    assert backbone.scored == []  # ITC only without rerank_k


def test_rerank_ranks_by_the_itm_logit_alone_over_the_itc_top_k(stub):
    backbone, tok, items = stub
    got = retrieval_recall(backbone, tok, items, ks=(1, 2), rerank_k=2)  # type: ignore[arg-type]
    # t2i: cap1 fixed (img0 beats img1 by ITM, img2 is not a candidate), cap5 fixed, cap3 broken by ITM
    assert got["itm_t2i_r@1"] == pytest.approx(5 / 6)
    assert got["itm_i2t_r@1"] == pytest.approx(1.0)  # img1: cap2 (ITM 3) over cap1 (ITM 1)
    assert got["itm_t2i_r@2"] == got["itm_i2t_r@2"] == 1.0
    top_images = {(t, i) for t in range(6) for i in ITC[t].topk(2).indices.tolist()}
    top_captions = {(t, i) for i in range(3) for t in ITC[:, i].topk(2).indices.tolist()}
    assert sorted(backbone.scored) == sorted([*top_images, *top_captions])  # ITM on the ITC top-k only
    assert (1, 2) not in backbone.scored


def test_itc_weight_adds_the_similarity_and_defaults_to_the_papers_zero(stub):
    backbone, tok, items = stub
    assert evaluation.ITC_WEIGHT == 0.0 and evaluation.K_TEST == 256  # UniAdapter's COCO config: beta, k_test
    default = retrieval_recall(backbone, tok, items, ks=(1,), rerank_k=2)  # type: ignore[arg-type]
    assert default == retrieval_recall(backbone, tok, items, ks=(1,), rerank_k=2, itc_weight=0.0)  # type: ignore[arg-type]
    mixed = retrieval_recall(backbone, tok, items, ks=(1,), rerank_k=2, itc_weight=10.0)  # type: ignore[arg-type]
    # ITM + 10 * ITC: cap3 right again (1 + 7 > 1.5 + 6), cap1 and cap5 wrong again (ITC outweighs ITM)
    assert mixed["itm_t2i_r@1"] == pytest.approx(4 / 6) and mixed["itm_i2t_r@1"] == pytest.approx(1.0)


def test_only_the_k_the_rerank_covers_are_reported(stub):
    backbone, tok, items = stub
    got = retrieval_recall(backbone, tok, items, ks=(1, 2, 5), rerank_k=1)  # type: ignore[arg-type]
    assert {k for k in got if k.startswith("itm_")} == {"itm_t2i_r@1", "itm_i2t_r@1"}
    assert got["itm_t2i_r@1"] == got["t2i_r@1"]  # one candidate: ITC's own first
    covered = retrieval_recall(backbone, tok, items, ks=(1, 5, 10), rerank_k=evaluation.K_TEST)  # type: ignore[arg-type]
    assert {k for k in covered if k.startswith("itm_")} == {f"itm_{d}_r@{k}" for d in ("t2i", "i2t")
                                                           for k in (1, 5, 10)}


def test_no_captions_is_an_input_error(stub):
    backbone, tok, _ = stub
    with pytest.raises(InputError, match="at least one item with a caption"):
        retrieval_recall(backbone, tok, [ImageText("img0", [])])  # type: ignore[arg-type]


def test_answer_accuracy_uses_the_official_vqa_metric(monkeypatch):
    answers = ["gray", "black", "red"]
    backbone, tok = StubBackbone(ITC, ITM), StubTokenizer(answers)
    monkeypatch.setattr(evaluation, "visual", stub_visual)
    # the model ranks "gray" first for the first question, "red" for the second
    monkeypatch.setattr(evaluation, "rank_answers", lambda *a, **k: SimpleNamespace(indices=torch.tensor([[0], [2]])))
    qas = [QA("img0", "What colour is the cat?", {"black": 0.7, "gray": 0.3}, humans=10),
           QA("img1", "And the car?", {"red": 1.0})]
    acc = answer_accuracy(backbone, tok, qas, answers)  # type: ignore[arg-type]
    assert acc == pytest.approx((0.9 + 1.0) / 2)  # 3 of 10 humans said gray: 0.9, not 1.0


# -- on the tiny random backbone, against scoring every pair one at a time ----------------------------

CAPTIONS = [["red circle left", "a red circle"], ["blue square", "big blue square right", "square"],
            ["green star"], ["two yellow triangles", "yellow"]]


def reference(backbone, tok, items, k: int, weight: float) -> dict[str, float]:
    captions = [clean_text(c, 30) for it in items for c in it.captions]
    owner = [n for n, it in enumerate(items) for _ in it.captions]
    size = backbone.config.vision_config.image_size
    with torch.inference_mode():
        feats, states = visual(backbone, [it.image for it in items], Routing.none(len(items)), size)
        ids, mask = tok.encode(captions, mode="text")
        sims = backbone.text_features(ids, mask) @ feats.T
        mm_ids, mm_mask = tok.encode(captions, mode="multimodal")
        itm = torch.tensor([[float(backbone.itm_logits(mm_ids[t:t + 1], mm_mask[t:t + 1], states[i:i + 1])[0, 1])
                             for i in range(len(items))] for t in range(len(captions))])
    out = {}
    for r in (1, 5):
        t2i, i2t = [], []
        for t in range(len(captions)):
            cands = sims[t].topk(min(k, len(items))).indices.tolist()
            ranked = sorted(cands, key=lambda i, t=t: -(itm[t, i] + weight * sims[t, i]))
            t2i.append(owner[t] in ranked[:r])
        for i in range(len(items)):
            cands = sims[:, i].topk(min(k, len(captions))).indices.tolist()
            ranked = sorted(cands, key=lambda t, i=i: -(itm[t, i] + weight * sims[t, i]))
            i2t.append(any(owner[t] == i for t in ranked[:r]))
        out[f"itm_t2i_r@{r}"], out[f"itm_i2t_r@{r}"] = float(np.mean(t2i)), float(np.mean(i2t))
    return out


@pytest.mark.parametrize(("k", "weight"), [(5, 0.0), (2, 0.0), (5, 0.5)])
def test_rerank_matches_a_pair_by_pair_reference(backbone, k, weight):
    tok = BlipTokenizer.demo(128)
    rng = np.random.default_rng(0)
    items = [ImageText(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), caps, key=str(n))
             for n, caps in enumerate(CAPTIONS)]
    got = retrieval_recall(backbone, tok, items, ks=(1, 5), rerank_k=k, itc_weight=weight, batch_size=3)
    want = {name: value for name, value in reference(backbone, tok, items, k, weight).items()
            if name.endswith("@1") or k >= 5}  # r@5 needs 5 re-ranked candidates
    assert {name: got[name] for name in want} == pytest.approx(want)
