"""`uniadapter eval`: text->image / image->text recall@k (BLIP/UniAdapter's protocol), VQA and VideoQA accuracy,
and moment retrieval in long videos (R@1 at IoU 0.5)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from uniadapter_serve.adapters.datasets import QA, SPLIT_OFFSETS, ImageText
from uniadapter_serve.adapters.training import visual
from uniadapter_serve.errors import InputError
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.media.video import plan_moments, sample_times
from uniadapter_serve.model.preprocess import array_to_tensor
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import CAPTION_WORDS, BlipTokenizer, clean_text
from uniadapter_serve.model.uniadapter import AdapterSetModule
from uniadapter_serve.model.vqa import rank_answers

RANK_K = 128
"""VQA answers kept by the first-token pruning and scored in full, ranked by BLIP's score (BLIP's k_test)"""
K_TEST = 256
"""ITC candidates re-ranked by ITM per query in UniAdapter's COCO config (its Flickr config: 128)"""
ITM_SCORES = ("match_logit", "log_odds")
ITC_WEIGHT = 0.0
"""beta in UniAdapter's configs: the re-ranking score is the ITM match logit + beta * ITC similarity, so 0 ranks
by the ITM logit alone"""


@torch.inference_mode()
def retrieval_recall(backbone: BlipBackbone, tokenizer: BlipTokenizer, items: Sequence[ImageText],
                     adapter: AdapterSetModule | None = None, batch_size: int = 64,
                     ks: tuple[int, ...] = (1, 5, 10), num_frames: int = 8, rerank_k: int = 0,
                     itc_weight: float = ITC_WEIGHT, caption_kinds: Sequence[str] | None = None,
                     itm_score: str = "match_logit") -> dict[str, float]:
    """Recall@k both ways over every caption of every item (COCO and Flickr: 5 per image), as BLIP and
    UniAdapter evaluate:

    - text->image (`t2i_r@k`): each caption is a query over the images; a hit is an image whose key equals
      the key of the caption's own item (real data: the image itself; demo: any scene the caption fits);
    - image->text (`i2t_r@k`): each image is a query over all captions; a hit is any caption of a matching item.

    `t2i_r@k` / `i2t_r@k` rank by ITC similarity alone. With `rerank_k` > 0 (the paper's protocol: `K_TEST`),
    also `itm_t2i_r@k` / `itm_i2t_r@k`: each query's top `rerank_k` candidates by ITC are re-scored by the
    ITM match logit + `itc_weight` * ITC similarity (the paper: `ITC_WEIGHT` = 0, the ITM logit alone), and
    rank above every other candidate. Those are reported for the k that the re-ranked candidates cover.

    `itm_score` is what the ITM head gives each pair: "match_logit" (BLIP's and UniAdapter's evaluation code: the
    match class's logit alone) or "log_odds" (match minus no-match logit: the order of the match probability, as
    the service re-ranks and reports `itm_score`).

    `caption_kinds` (one per caption, in item order) adds text->image R@1 per kind: `t2i_r@1_<kind>` (and
    `itm_t2i_r@1_<kind>` with `rerank_k`)."""
    if not items or not any(it.captions for it in items):
        raise InputError("retrieval needs at least one item with a caption")
    if itm_score not in ITM_SCORES:
        raise InputError(f"itm_score: {itm_score!r} is not one of {', '.join(ITM_SCORES)}")
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
    kinds = list(caption_kinds) if caption_kinds is not None else None
    if kinds is not None:
        if len(kinds) != len(captions):
            raise InputError(f"caption_kinds: {len(kinds)} kinds for {len(captions)} captions")
        out.update(_recall_at_1_by_kind(sims, text_key, image_key, kinds, ""))
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
            pair = backbone.itm_logits(mm_ids[t].to(device), mm_mask[t].to(device), states_all[i.to(states_all.device)],
                                       Routing.single(adapter, t.numel())).float().cpu()
            logits.append(pair[:, 1] - pair[:, 0] if itm_score == "log_odds" else pair[:, 1])
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
    if kinds is not None:
        out.update(_recall_at_1_by_kind(t2i, text_key, image_key, kinds, "itm_"))
    return out


def _recall_at_1_by_kind(t2i: torch.Tensor, text_key: torch.Tensor, image_key: torch.Tensor, kinds: list[str],
                         prefix: str) -> dict[str, float]:
    hits = (image_key[t2i.argmax(dim=1)] == text_key).float().tolist()
    return {f"{prefix}t2i_r@1_{kind}": value for kind, value in by_kind(hits, kinds).items()}


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


def answer_accuracy(backbone: BlipBackbone, tokenizer: BlipTokenizer, qas: Sequence[QA], answers: list[str],
                    adapter: AdapterSetModule | None = None, batch_size: int = 32, num_frames: int = 8) -> float:
    """Mean accuracy of rank-mode answers over `answers`: the official VQA v2 accuracy for questions with
    human answers (`QA.humans` > 0), exact match otherwise (demo, MSRVTT-QA); see `QA.accuracy`."""
    scores = answer_scores(backbone, tokenizer, qas, answers, adapter, batch_size, num_frames)
    return sum(scores) / max(1, len(scores))


@torch.inference_mode()
def answer_scores(backbone: BlipBackbone, tokenizer: BlipTokenizer, qas: Sequence[QA], answers: list[str],
                  adapter: AdapterSetModule | None = None, batch_size: int = 32, num_frames: int = 8) -> list[float]:
    """Each question's accuracy (`QA.accuracy` of its best-ranked answer), in the order of `qas`."""
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    cand_ids, cand_mask = tokenizer.encode_answers(answers)
    cand_ids, cand_mask = cand_ids.to(backbone.device), cand_mask.to(backbone.device)
    scores: list[float] = []
    for start in range(0, len(qas), batch_size):
        chunk = qas[start:start + batch_size]
        r = Routing.single(adapter, len(chunk))
        _, states = visual(backbone, [q.media for q in chunk], r, size, num_frames)
        ids, mask = tokenizer.encode([clean_text(q.question, 50) for q in chunk], mode="multimodal")
        ids, mask = ids.to(backbone.device), mask.to(backbone.device)
        question = backbone.encode_multimodal(ids, mask, states, None, r)
        ranked = rank_answers(backbone, question, mask, cand_ids, cand_mask, k=min(RANK_K, len(answers)),
                              routing=r, score="blip")
        scores += [q.accuracy(answers[best]) for q, best in zip(chunk, ranked.indices[:, 0].tolist(), strict=True)]
    return scores


def by_kind(scores: Sequence[float], kinds: Sequence[str]) -> dict[str, float]:
    """Mean score per kind (e.g. per question type), kinds in sorted order."""
    groups: dict[str, list[float]] = {}
    for score, kind in zip(scores, kinds, strict=True):
        groups.setdefault(kind, []).append(score)
    return {kind: sum(g) / len(g) for kind, g in sorted(groups.items())}


# -- moments in long videos ------------------------------------------------------------------------------

MOMENT_IOU = 0.5
"""a moment finds an event when their temporal IoU is at least this (the moment-retrieval convention, R@1 IoU=0.5)"""


@dataclass(frozen=True)
class TimedEvent:
    caption: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class TimedVideo:
    """A long video as frames at `fps` (frame k shown from k / fps) and the events that happen in it."""

    frames: Sequence[np.ndarray]
    """(H, W, 3) uint8 each"""
    fps: float
    events: Sequence[TimedEvent]

    @property
    def duration_s(self) -> float:
        return len(self.frames) / self.fps


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def window_frames(video: TimedVideo, span: tuple[float, float], num_frames: int = 8) -> list[np.ndarray]:
    """The frames the service embeds for a moment: `num_frames` instants uniform in the span (the middle of each
    of equal parts), each showing the last frame at or before it (as the decoder picks them from the file)."""
    last = len(video.frames) - 1
    return [video.frames[max(0, min(last, math.floor(t * video.fps + 1e-9)))]
            for t in sample_times(span[0], span[1] - span[0], num_frames)]


def moment_recall(moment_feats: Sequence[torch.Tensor], spans: Sequence[Sequence[tuple[float, float]]],
                  query_feats: torch.Tensor, query_video: Sequence[int], query_span: Sequence[tuple[float, float]],
                  iou: float = MOMENT_IOU) -> dict[str, float]:
    """R@1 at IoU `iou` of text queries over moments: `moment_feats[v]` (M_v, D) embeds video v's moments
    `spans[v]`; query q (`query_feats[q]`, (D,)) asks for the event at `query_span[q]` of video `query_video[q]`.

    - `moment_r@1_iou{iou}`: the query's best moment within its own video (a search filtered to the video)
      overlaps the event with IoU >= `iou`;
    - `corpus_moment_r@1_iou{iou}`: the best moment over all videos is in the query's video and does;
    - `oracle_iou{iou}`: some moment of the video does (the ceiling the windows allow)."""
    if not len(query_video):
        raise InputError("moment recall needs at least one query")
    feats = torch.cat(list(moment_feats)).float()  # (M, D), all moments of all videos
    owner = torch.cat([torch.full((len(s),), v) for v, s in enumerate(spans)])
    offsets = [0]
    for s in spans:
        offsets.append(offsets[-1] + len(s))
    sims = query_feats.float() @ feats.T  # (Q, M)
    within = corpus = oracle = 0
    for q, (video, event) in enumerate(zip(query_video, query_span, strict=True)):
        lo, hi = offsets[video], offsets[video + 1]
        overlaps = [temporal_iou(span, event) >= iou for span in spans[video]]
        within += overlaps[int(sims[q, lo:hi].argmax())]
        best = int(sims[q].argmax())
        corpus += int(owner[best]) == video and overlaps[best - lo]
        oracle += any(overlaps)
    n = len(query_video)
    return {f"moment_r@1_iou{iou:g}": within / n, f"corpus_moment_r@1_iou{iou:g}": corpus / n,
            f"oracle_iou{iou:g}": oracle / n}


@torch.inference_mode()
def long_video_recall(backbone: BlipBackbone, tokenizer: BlipTokenizer, videos: Sequence[TimedVideo],
                      adapter: AdapterSetModule | None = None, window_s: float = 8.0, stride_s: float = 4.0,
                      num_frames: int = 8, batch_size: int = 32, iou: float = MOMENT_IOU) -> dict[str, float]:
    """Moment retrieval on long videos as a moment collection serves it: each video cut into windows of
    `window_s` every `stride_s` (`plan_moments`), each window's `num_frames` frames embedded like a clip, each
    event's caption a text query (`moment_recall` for the figures; also the number of moments and queries)."""
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    spans = [plan_moments(v.duration_s, window_s, stride_s) for v in videos]
    clips = [window_frames(v, span, num_frames) for v, s in zip(videos, spans, strict=True) for span in s]
    feats = []
    for start in range(0, len(clips), batch_size):
        chunk = clips[start:start + batch_size]
        f, _ = visual(backbone, chunk, Routing.single(adapter, len(chunk)), size, num_frames)
        feats.append(f.float())
    all_feats = torch.cat(feats)
    moment_feats = list(all_feats.split([len(s) for s in spans]))
    captions = [clean_text(e.caption, CAPTION_WORDS) for v in videos for e in v.events]
    text = []
    for start in range(0, len(captions), batch_size):
        chunk_text = captions[start:start + batch_size]
        ids, mask = tokenizer.encode(chunk_text, mode="text")
        text.append(backbone.text_features(ids.to(backbone.device), mask.to(backbone.device),
                                           Routing.single(adapter, len(chunk_text))).float())
    out = moment_recall(moment_feats, spans, torch.cat(text).cpu(),
                        [v for v, video in enumerate(videos) for _ in video.events],
                        [(e.start_s, e.end_s) for v in videos for e in v.events], iou)
    out.update(moments=float(len(clips)), queries=float(len(captions)))
    return out


DEMO_MOMENT_FIRST = 2_000_000
"""held-out long videos (the demo's evaluation indices; training never sees long videos, shipped ones start at
3,000,000)"""


def demo_timed_videos(world: World, n: int, first: int = DEMO_MOMENT_FIRST, fps: int = 2) -> list[TimedVideo]:
    """`n` of the demo world's long videos from index `first`, rendered at `fps` with their events."""
    out = []
    for index in range(first, first + n):
        video = world.long_video(index, fps=fps)
        out.append(TimedVideo(world.render_long_video(video), fps,
                              [TimedEvent(e.caption(), e.start_s, e.end_s) for e in video.events]))
    return out


@torch.inference_mode()
def position_probe(backbone: BlipBackbone, world: World, *, n_train: int = 1000, n_test: int = 500,
                   batch_size: int = 64, ridge: float = 1e-2, tokenizer: BlipTokenizer | None = None
                   ) -> dict[str, float]:
    """How well a linear probe reads a lone shape's side (left / right) from the frozen backbone: ridge
    regression on the standardised image [CLS] state (`cls`) or mean-pooled patch states (`mean_patches`) of
    `n_train` training scenes of one shape, accuracy on `n_test` held-out ones (chance 0.5). With a `tokenizer`,
    also from the path a VQA question takes (`question`): the multimodal [CLS] state of "is the <shape> on the
    left or right" cross-attending to the image. What pre-training kept of position, before any adapter."""
    def features(start: int, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        scenes = [world.scene(i, num_shapes=1) for i in range(start, start + n)]
        out: dict[str, list[torch.Tensor]] = {"cls": [], "mean_patches": [], "question": []}
        for at in range(0, n, batch_size):
            chunk = scenes[at:at + batch_size]
            px = torch.stack([array_to_tensor(np.asarray(world.render(s))) for s in chunk]).to(backbone.device)
            bare = Routing.none(len(chunk))
            tokens = backbone.encode_image(px.to(backbone.dtype), bare)
            out["cls"].append(tokens[:, 0].float().cpu())
            out["mean_patches"].append(tokens[:, 1:].float().mean(1).cpu())
            if tokenizer is not None:
                questions = [f"is the {s.shapes[0].shape} on the left or right" for s in chunk]
                ids, mask = tokenizer.encode(questions, mode="multimodal")
                states = backbone.encode_multimodal(ids.to(backbone.device), mask.to(backbone.device), tokens, None,
                                                    bare)
                out["question"].append(states[:, 0].float().cpu())
        side = torch.tensor([1.0 if s.shapes[0].x >= 0.5 else -1.0 for s in scenes])
        return {name: torch.cat(rows) for name, rows in out.items() if rows}, side

    train_x, train_y = features(SPLIT_OFFSETS["train"], n_train)
    test_x, test_y = features(SPLIT_OFFSETS["test"], n_test)
    out: dict[str, float] = {}
    for name in train_x:
        x, t = train_x[name], test_x[name]
        mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
        x, t = (x - mu) / sd, (t - mu) / sd
        x1, t1 = torch.cat([x, torch.ones(len(x), 1)], 1), torch.cat([t, torch.ones(len(t), 1)], 1)
        w = torch.linalg.solve(x1.T @ x1 + ridge * len(x) * torch.eye(x1.shape[1]), x1.T @ train_y)
        out[name] = float(((t1 @ w).sign() == test_y).float().mean())
    return out
