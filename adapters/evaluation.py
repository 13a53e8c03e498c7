"""`uniadapter eval`: text->image / image->text recall@k, VQA and VideoQA accuracy."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from uniadapter_serve.adapters.datasets import QA, ImageText, vqa_accuracy
from uniadapter_serve.adapters.training import visual
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text
from uniadapter_serve.model.uniadapter import AdapterSetModule
from uniadapter_serve.model.vqa import rank_answers


@torch.inference_mode()
def retrieval_recall(backbone: BlipBackbone, tokenizer: BlipTokenizer, items: Sequence[ImageText],
                     adapter: AdapterSetModule | None = None, batch_size: int = 64,
                     ks: tuple[int, ...] = (1, 5, 10), num_frames: int = 8) -> dict[str, float]:
    """Text->image (one query per item's first caption) and image->text recall@k. A hit is any item
    whose key equals the query's (a scene that satisfies the caption), as in the demo world."""
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    image_feats, text_feats = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        r = Routing.single(adapter, len(chunk))
        image_feats.append(visual(backbone, [it.image for it in chunk], r, size, num_frames)[0].float())
        ids, mask = tokenizer.encode([clean_text(it.captions[0], 30) for it in chunk], mode="text")
        text_feats.append(backbone.text_features(ids.to(backbone.device), mask.to(backbone.device), r).float())
    images, texts = torch.cat(image_feats), torch.cat(text_feats)
    keys = [it.key or it.captions[0] for it in items]
    match = torch.tensor([[a == b for b in keys] for a in keys])
    sims = texts @ images.T  # (queries, images)
    out: dict[str, float] = {}
    for k in ks:
        top_t2i = sims.topk(min(k, len(items)), dim=1).indices.cpu()
        out[f"t2i_r@{k}"] = float(match.gather(1, top_t2i).any(dim=1).float().mean())
        top_i2t = sims.T.topk(min(k, len(items)), dim=1).indices.cpu()
        out[f"i2t_r@{k}"] = float(match.gather(1, top_i2t).any(dim=1).float().mean())
    return out


@torch.inference_mode()
def answer_accuracy(backbone: BlipBackbone, tokenizer: BlipTokenizer, qas: Sequence[QA], answers: list[str],
                    adapter: AdapterSetModule | None = None, batch_size: int = 32, num_frames: int = 8) -> float:
    """Accuracy of rank-mode answers over `answers` (VQA v2 soft accuracy; exact match for demo data)."""
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
            total += vqa_accuracy(answers[best], q.answers)
    return total / max(1, len(qas))
