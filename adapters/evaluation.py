"""`uniadapter eval`: text->image / image->text recall@k (BLIP/UniAdapter's protocol), VQA and VideoQA accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uniadapter_serve.adapters.datasets import QA, ImageText
from uniadapter_serve.adapters.training import visual
from uniadapter_serve.errors import InputError
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text
from uniadapter_serve.model.uniadapter import AdapterSetModule
from uniadapter_serve.model.vqa import rank_answers

RANK_K = 128
"""VQA answers kept by the first-token pruning and scored in full, ranked by BLIP's score (BLIP's k_test)"""
K_TEST = 256
"""ITC candidates re-ranked by ITM per query in UniAdapter's COCO config (its Flickr config: 128)"""
ITC_WEIGHT = 0.0
"""beta in UniAdapter's configs: the re-ranking score is the ITM match logit + beta * ITC similarity, so 0 ranks
by the ITM logit alone"""


@torch.inference_mode()
def retrieval_recall(backbone: BlipBackbone, tokenizer: BlipTokenizer, items: Sequence[ImageText],
                     adapter: AdapterSetModule | None = None, batch_size: int = 64,
                     ks: tuple[int, ...] = (1, 5, 10), num_frames: int = 8, rerank_k: int = 0,
                     itc_weight: float = ITC_WEIGHT) -> dict[str, float]:
    """Recall@k both ways over every caption of every item (COCO and Flickr: 5 per image), as BLIP and
    UniAdapter evaluate:

    - text->image (`t2i_r@k`): each caption is a query over the images; a hit is an image whose key equals
      the key of the caption's own item (real data: the image itself; demo: any scene the caption fits);
    - image->text (`i2t_r@k`): each image is a query over all captions; a hit is any caption of a matching item.

    `t2i_r@k` / `i2t_r@k` rank by ITC similarity alone. With `rerank_k` > 0 (the paper's protocol: `K_TEST`),
    also `itm_t2i_r@k` / `itm_i2t_r@k`: each query's top `rerank_k` candidates by ITC are re-scored by the
    ITM match logit + `itc_weight` * ITC similarity (the paper: `ITC_WEIGHT` = 0, the ITM logit alone), and
    rank above every other candidate. Those are reported for the k that the re-ranked candidates cover."""
    if not items or not any(it.captions for it in items):
        raise InputError("retrieval needs at least one item with a caption")
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    device = backbone.device
    captions = [clean_text(c, 30) for it in items for c in it.captions]
    key_ids: dict[str, int] = {}
    image_key = torch.tensor([key_ids.setdefault(it.key or it.captions[0], len(key_ids)) for it in items])
    text_key = torch.tensor([int(image_key[i]) for i, it in enumerate(items) for _ in it.captions])
    image_feats, all_states, text_feats = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        feats, states = visual(backbone, [it.image for it in chunk], Routing.single(adapter, len(chunk)), size,
                               num_frames)
        image_feats.append(feats.float())
        all_states.append(states)
    for start in range(0, len(captions), batch_size):
        chunk_text = captions[start:start + batch_size]
        ids, mask = tokenizer.encode(chunk_text, mode="text")
        text_feats.append(backbone.text_features(ids.to(device), mask.to(device),
                                                 Routing.single(adapter, len(chunk_text))).float())
    sims = (torch.cat(text_feats) @ torch.cat(image_feats).T).cpu()  # (captions T, images I)
    out = _recall(sims, sims.T, text_key, image_key, ks, "")
    if rerank_k <= 0:
        return out
    n_texts, n_images = sims.shape
    mm_ids, mm_mask = tokenizer.encode(captions, mode="multimodal")
    states_all = torch.cat(all_states)  # (I, L, D)

    def itm(text_of: torch.Tensor, image_of: torch.Tensor) -> torch.Tensor:
        """ITM match logits of the (caption, image) pairs text_of[j], image_of[j]."""
        logits = []
        for start in range(0, text_of.numel(), batch_size):
            t, i = text_of[start:start + batch_size], image_of[start:start + batch_size]
            logits.append(backbone.itm_logits(mm_ids[t].to(device), mm_mask[t].to(device),
                                              states_all[i.to(states_all.device)],
                                              Routing.single(adapter, t.numel()))[:, 1].float().cpu())
        return torch.cat(logits)

    k_images, k_texts = min(rerank_k, n_images), min(rerank_k, n_texts)
    top = sims.topk(k_images, dim=1)  # per caption: candidate images, (T, k)
    score = itm(torch.arange(n_texts).repeat_interleave(k_images), top.indices.flatten()).view(n_texts, k_images)
    t2i = torch.full_like(sims, -torch.inf).scatter_(1, top.indices, score + itc_weight * top.values)
    top = sims.T.topk(k_texts, dim=1)  # per image: candidate captions, (I, k)
    score = itm(top.indices.flatten(), torch.arange(n_images).repeat_interleave(k_texts)).view(n_images, k_texts)
    i2t = torch.full_like(sims.T, -torch.inf).scatter_(1, top.indices, score + itc_weight * top.values)
    covered = _recall(t2i, i2t, text_key, image_key, ks, "itm_")
    out.update({name: value for name, value in covered.items()
                if int(name.rsplit("@", 1)[1]) <= rerank_k
                or rerank_k >= (n_images if name.startswith("itm_t2i") else n_texts)})
    return out


def _recall(t2i: torch.Tensor, i2t: torch.Tensor, text_key: torch.Tensor, image_key: torch.Tensor,
            ks: tuple[int, ...], prefix: str) -> dict[str, float]:
    """Recall@k from (captions, images) text->image scores and (images, captions) image->text scores; a
    caption and an image match when their keys are equal."""
    out: dict[str, float] = {}
    for k in ks:
        hits = image_key[t2i.topk(min(k, t2i.shape[1]), dim=1).indices] == text_key[:, None]
        out[f"{prefix}t2i_r@{k}"] = float(hits.any(dim=1).float().mean())
        hits = text_key[i2t.topk(min(k, i2t.shape[1]), dim=1).indices] == image_key[:, None]
        out[f"{prefix}i2t_r@{k}"] = float(hits.any(dim=1).float().mean())
    return out


@torch.inference_mode()
def answer_accuracy(backbone: BlipBackbone, tokenizer: BlipTokenizer, qas: Sequence[QA], answers: list[str],
                    adapter: AdapterSetModule | None = None, batch_size: int = 32, num_frames: int = 8) -> float:
    """Mean accuracy of rank-mode answers over `answers`: the official VQA v2 accuracy for questions with
    human answers (`QA.humans` > 0), exact match otherwise (demo, MSRVTT-QA); see `QA.accuracy`."""
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    cand_ids, cand_mask = tokenizer.encode_answers(answers)
    cand_ids, cand_mask = cand_ids.to(backbone.device), cand_mask.to(backbone.device)
    total = 0.0
    for start in range(0, len(qas), batch_size):
        chunk = qas[start:start + batch_size]
        r = Routing.single(adapter, len(chunk))
        _, states = visual(backbone, [q.media for q in chunk], r, size, num_frames)
        ids, mask = tokenizer.encode([clean_text(q.question, 50) for q in chunk], mode="multimodal")
        ids, mask = ids.to(backbone.device), mask.to(backbone.device)
        question = backbone.encode_multimodal(ids, mask, states, None, r)
        ranked = rank_answers(backbone, question, mask, cand_ids, cand_mask, k=min(RANK_K, len(answers)),
                              routing=r, score="blip")
        for q, best in zip(chunk, ranked.indices[:, 0].tolist(), strict=True):
            total += q.accuracy(answers[best])
    return total / max(1, len(qas))
