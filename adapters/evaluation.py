"""`uniadapter eval`: text->image / image->text recall@k, VQA and VideoQA accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uniadapter_serve.adapters.datasets import QA, ImageText
from uniadapter_serve.adapters.training import visual
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text
from uniadapter_serve.model.uniadapter import AdapterSetModule
from uniadapter_serve.model.vqa import rank_answers


@torch.inference_mode()
def retrieval_recall(backbone: BlipBackbone, tokenizer: BlipTokenizer, items: Sequence[ImageText],
                     adapter: AdapterSetModule | None = None, batch_size: int = 64,
                     ks: tuple[int, ...] = (1, 5, 10), num_frames: int = 8, rerank_k: int = 0) -> dict[str, float]:
    """Text->image (one query per item's first caption) and image->text recall@k. A hit is any item
    whose key equals the query's (a scene that satisfies the caption), as in the demo world.

    `t2i_r@k` / `i2t_r@k` rank by ITC similarity alone. With `rerank_k`, also `itm_t2i_r@k` /
    `itm_i2t_r@k`: BLIP's evaluation protocol, where each query's top `rerank_k` by ITC are re-scored by
    the ITM head (match logit + ITC similarity)."""
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    image_feats, text_feats, all_states = [], [], []
    captions = [clean_text(it.captions[0], 30) for it in items]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        r = Routing.single(adapter, len(chunk))
        feats, states = visual(backbone, [it.image for it in chunk], r, size, num_frames)
        image_feats.append(feats.float())
        all_states.append(states)
        ids, mask = tokenizer.encode(captions[start:start + batch_size], mode="text")
        text_feats.append(backbone.text_features(ids.to(backbone.device), mask.to(backbone.device), r).float())
    images, texts = torch.cat(image_feats), torch.cat(text_feats)
    keys = [it.key or it.captions[0] for it in items]
    match = torch.tensor([[a == b for b in keys] for a in keys])
    sims = (texts @ images.T).cpu()  # (queries, images)
    out = _recall(sims, match, ks, "")
    if rerank_k > 0:
        k = min(rerank_k, len(items))
        ids, mask = tokenizer.encode(captions, mode="multimodal")
        states = torch.cat(all_states)

        def rescore(scores: torch.Tensor, text_of: torch.Tensor, image_of: torch.Tensor) -> torch.Tensor:
            logits = []
            for start in range(0, text_of.numel(), batch_size):
                t, i = text_of[start:start + batch_size], image_of[start:start + batch_size]
                r = Routing.single(adapter, t.numel())
                logits.append(backbone.itm_logits(ids[t].to(backbone.device), mask[t].to(backbone.device),
                                                  states[i.to(states.device)], r)[:, 1].float().cpu())
            return torch.cat(logits).view(scores.shape) + scores

        top = sims.topk(k, dim=1)  # per text query: candidate images
        t2i = torch.full_like(sims, -torch.inf).scatter_(
            1, top.indices, rescore(top.values, torch.arange(len(items)).repeat_interleave(k), top.indices.flatten()))
        top = sims.T.topk(k, dim=1)  # per image query: candidate texts
        i2t = torch.full_like(sims, -torch.inf).scatter_(
            1, top.indices, rescore(top.values, top.indices.flatten(), torch.arange(len(items)).repeat_interleave(k)))
        out.update(_recall(t2i, match, tuple(x for x in ks if x <= k), "itm_", i2t))
    return out


def _recall(t2i: torch.Tensor, match: torch.Tensor, ks: tuple[int, ...], prefix: str,
            i2t: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@k from (queries, images) text->image scores and (images, texts) image->text scores
    (default: the transpose)."""
    i2t = t2i.T if i2t is None else i2t
    out: dict[str, float] = {}
    for k in ks:
        n = min(k, t2i.shape[1])
        out[f"{prefix}t2i_r@{k}"] = float(match.gather(1, t2i.topk(n, dim=1).indices).any(dim=1).float().mean())
        out[f"{prefix}i2t_r@{k}"] = float(match.gather(1, i2t.topk(n, dim=1).indices).any(dim=1).float().mean())
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
        ranked = rank_answers(backbone, question, mask, cand_ids, cand_mask, k=min(8, len(answers)), routing=r)
        for q, best in zip(chunk, ranked.indices[:, 0].tolist(), strict=True):
            total += q.accuracy(answers[best])
    return total / max(1, len(qas))
