"""The batcher's stage handlers: each runs a list of jobs as one forward pass over the backbone.

Payloads are built (decoded, tokenised) by the routes outside the model thread; results go
back per job. Every handler takes a per-sample `Routing`, so one batch serves many adapter sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import BlipConfig

from uniadapter_serve.model.backbone import BlipBackbone, text_config, vision_config
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.vqa import RankScore, beam_search_answers, generate_answers, rank_answers
from uniadapter_serve.service.batcher import Handler, Job


@dataclass
class VisionInput:
    pixels: torch.Tensor
    """(T, 3, S, S): one frame for an image, T frames for a video."""
    video: bool = False
    embed: bool = True
    """compute the ITC embedding (retrieval); answering needs only the states, and a VQA checkpoint has no
    projection head to compute it with"""


@dataclass
class VisionOutput:
    states: torch.Tensor
    """(N, D) image tokens or (T*N, D) concatenated frame tokens (+ temporal embedding)."""
    embedding: torch.Tensor | None
    """(E,) L2-normalised ITC embedding (image; mean of frame [CLS] for a video); None unless asked for."""
    frame_embeddings: torch.Tensor | None = None
    """(T, E) per-frame ITC embeddings, for sets with frame-aware attention (video only)."""
    tokens_per_frame: int = 0


@dataclass
class TextInput:
    ids: torch.Tensor
    """(L,) [CLS] first"""
    mask: torch.Tensor


@dataclass
class MatchInput:
    ids: torch.Tensor
    """(L,) [ENC] first"""
    mask: torch.Tensor
    states: torch.Tensor
    """(N, D) visual states from the vision stage"""
    text_embedding: torch.Tensor | None = None
    """(E,) the text's ITC embedding; with frame_embeddings it drives frame-aware attention"""
    frame_embeddings: torch.Tensor | None = None
    tokens_per_frame: int = 0


@dataclass
class AnswerInput:
    ids: torch.Tensor
    """(L,) question, [ENC] first"""
    mask: torch.Tensor
    states: torch.Tensor
    mode: Literal["rank", "generate"]
    top_k: int
    candidates: tuple[torch.Tensor, torch.Tensor] | None = None
    """(C, A) answer ids and mask for rank mode ([DEC] first)"""
    rank_k: int = 1
    """rank mode: candidates kept by the first-token pruning and scored in full (>= top_k)"""
    rank_score: RankScore = "likelihood"
    max_length: int = 10
    num_beams: int = 1
    """generate mode: 1 = greedy, else beam search"""


@dataclass
class AnswerOutput:
    indices: list[int] | None
    """rank mode: candidate indices, best first"""
    tokens: list[torch.Tensor] | None
    """generate mode: the answers' ids ([DEC] first), best first (one, or one per beam)"""
    scores: list[float]
    """log-likelihood of each answer"""


def step_macs(config: BlipConfig, stage: str, payloads: Sequence[Any]) -> float:
    """Multiply-adds of one forward step of a batch of `payloads` (a whole pass for the encoders, one
    decoding step for answers): how much one op of it has to split across intra-op threads."""
    if stage == "vision":
        vc = vision_config(config)
        patches = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1  # type: ignore[arg-type]
        rows = sum(int(p.pixels.shape[0]) * patches for p in payloads)
        return rows * 12.0 * vc.hidden_size ** 2 * vc.num_hidden_layers
    tc = text_config(config)
    layer = 12.0 * tc.hidden_size ** 2 * tc.num_hidden_layers
    if stage == "answer":  # decoding steps dominate: one row per beam, about k rows (its prefix tree) for rank
        rows = sum(p.rank_k if p.mode == "rank" else p.num_beams for p in payloads)
        return rows * (layer * 4 / 3 + tc.vocab_size * tc.hidden_size)
    return sum(int(p.ids.shape[0]) for p in payloads) * layer * (4 / 3 if stage == "itm" else 1)


def pad_stack(rows: Sequence[torch.Tensor], value: float = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad 1-D or 2-D rows along dim 0 -> (B, Lmax, ...) and a (B, Lmax) mask, or None when every
    row has the same length (decided on the host from the shapes: no device sync, and attention runs
    without a mask)."""
    lengths = [r.shape[0] for r in rows]
    longest = max(lengths)
    out = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), value)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    if min(lengths) == longest:
        return out, None
    mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
    return out, mask.to(rows[0].device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Results go back to the host once per batch, in the model thread (never a sync per row, and never
    on the event loop): one call per handler."""
    return [t.detach().cpu() for t in tensors]


def make_handlers(backbone: BlipBackbone, *, bos_id: int, sep_id: int, pad_id: int) -> dict[str, Handler]:
    device, dtype = backbone.device, backbone.dtype

    def vision(jobs: Sequence[Job], routing: Routing) -> list[Any]:
        inputs: list[VisionInput] = [j.payload for j in jobs]
        counts = [x.pixels.shape[0] for x in inputs]
        frames = torch.cat([x.pixels for x in inputs])
        if device.type == "cuda":
            frames = frames.pin_memory()  # page-locked: the copy below overlaps with queued GPU work
        frames = frames.to(device, dtype, non_blocking=True)
        frame_routing = _expand(routing, counts, device)
        tokens = backbone.encode_image(frames, frame_routing)  # (sum T, N, D)
        per_job = tokens.split(counts)
        wanted = [i for i, x in enumerate(inputs) if x.embed]
        host: list[torch.Tensor | None] = [None] * len(inputs)
        if wanted:
            pooled = torch.stack([per_job[i][:, 0].mean(dim=0) for i in wanted])  # (B', D)
            rows = routing if len(wanted) == len(inputs) else routing.select(torch.tensor(wanted, device=device))
            # normalised in float32 (a bf16 norm is off by ~4e-3), then to the host once for the whole batch
            embeddings = F.normalize(rows.head("vision_proj", pooled, backbone.vision_proj).float(), dim=-1)
            for i, e in zip(wanted, to_host(embeddings)[0], strict=True):
                host[i] = e
        outputs: list[Any] = []
        for i, (x, t) in enumerate(zip(inputs, per_job, strict=True)):
            if not x.video:
                outputs.append(VisionOutput(states=t[0], embedding=host[i]))
                continue
            row = routing.select(torch.tensor([i], device=device))
            states = backbone.video_states(t[None], row)[0]
            frame_aware = any(r.adapter.config.frame_aware_attention for r in row.routes)
            per_frame = backbone.frame_embeddings(t[None], row)[0].float() if frame_aware and x.embed else None
            outputs.append(VisionOutput(states=states, embedding=host[i], frame_embeddings=per_frame,
                                        tokens_per_frame=t.shape[1]))
        return outputs

    def text(jobs: Sequence[Job], routing: Routing) -> list[Any]:
        ids, mask = pad_stack([j.payload.ids for j in jobs], pad_id)
        (host,) = to_host(backbone.text_features(ids.to(device), _to(mask, device), routing))
        return list(host)

    def itm(jobs: Sequence[Job], routing: Routing) -> list[Any]:
        ids, mask = pad_stack([j.payload.ids for j in jobs], pad_id)
        states, states_mask = pad_stack([j.payload.states for j in jobs])
        scale = _frame_aware_scale(backbone, jobs, routing, states.shape[1])
        logits = backbone.itm_logits(ids.to(device), _to(mask, device), states, routing, states_mask=states_mask,
                                     key_scale=scale)
        (probs,) = to_host(logits.float().softmax(dim=-1)[:, 1])
        return probs.tolist()

    def answer(jobs: Sequence[Job], routing: Routing) -> list[Any]:
        inputs: list[AnswerInput] = [j.payload for j in jobs]
        ids, padded = pad_stack([x.ids for x in inputs], pad_id)
        ids = ids.to(device)
        # the decoder needs a question mask: ones where every question has the same length
        mask = padded.to(device, non_blocking=True) if padded is not None else torch.ones_like(ids)
        states, states_mask = pad_stack([x.states for x in inputs])
        question = backbone.encode_multimodal(ids, mask if padded is not None else None, states, states_mask,
                                              routing)  # (B, Q, D)
        results: list[Any] = [None] * len(jobs)
        # rank jobs sharing one candidate list run together; generate jobs of one beam width run together
        # (rank jobs also need the same k and score: a job's answers never depend on its batch)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, x in enumerate(inputs):
            key = (("rank", id(x.candidates), x.rank_k, x.rank_score) if x.mode == "rank"
                   else ("generate", x.num_beams))
            groups.setdefault(key, []).append(i)
        outcomes: list[tuple[tuple[Any, ...], list[int], torch.Tensor, torch.Tensor]] = []
        for key, rows in groups.items():
            index = torch.tensor(rows, device=device)
            sub = routing.select(index)
            q, qmask = question.index_select(0, index), mask.index_select(0, index)
            if key[0] == "generate":
                longest = max(inputs[i].max_length for i in rows)
                if key[1] == 1:
                    out_ids, scores = generate_answers(backbone, q, qmask, bos_id, sep_id, pad_id, longest, sub)
                    out_ids, scores = out_ids[:, None], scores[:, None]  # (B, 1, L), (B, 1)
                else:
                    beams = beam_search_answers(backbone, q, qmask, bos_id, sep_id, pad_id, key[1], longest, sub)
                    out_ids, scores = beams.ids, beams.scores
                outcomes.append((key, rows, out_ids, scores))
            else:
                cand = inputs[rows[0]].candidates
                assert cand is not None
                x = inputs[rows[0]]
                ranked = rank_answers(backbone, q, qmask, cand[0].to(device), cand[1].to(device),
                                      max(x.rank_k, x.top_k), sub, score=x.rank_score)
                outcomes.append((key, rows, ranked.indices, ranked.scores))
        hosted = to_host(*(t for _, _, a, b in outcomes for t in (a, b)))  # one transfer for every group
        for n, (key, rows, _, _) in enumerate(outcomes):
            first, second = hosted[2 * n], hosted[2 * n + 1]
            for row, i in enumerate(rows):
                top = inputs[i].top_k
                if key[0] == "generate":
                    results[i] = AnswerOutput(None, list(first[row, :top]), second[row, :top].tolist())
                else:
                    results[i] = AnswerOutput(first[row, :top].tolist(), None, second[row, :top].tolist())
        return results

    return {"vision": vision, "text": text, "itm": itm, "answer": answer}


def _to(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if mask is None else mask.to(device, non_blocking=True)


def _frame_aware_scale(backbone: BlipBackbone, jobs: Sequence[Job], routing: Routing,
                       width: int) -> torch.Tensor | None:
    """(B, width) key weights for the video jobs whose set enables frame-aware attention; None if none do."""
    scale: torch.Tensor | None = None
    for i, job in enumerate(jobs):
        x: MatchInput = job.payload
        if x.frame_embeddings is None or x.text_embedding is None:
            continue
        device = x.states.device
        row = routing.select(torch.tensor([i], device=device))
        weights = backbone.frame_aware_scale(x.text_embedding[None].to(device), x.frame_embeddings[None].to(device),
                                             x.tokens_per_frame, row)
        if weights is None:
            continue
        if scale is None:
            scale = torch.ones(len(jobs), width, device=device)
        scale[i, : weights.shape[1]] = weights[0]
    return scale


def _expand(routing: Routing, counts: list[int], device: torch.device) -> Routing:
    """Routing over frames: job i's set serves its counts[i] frames."""
    if all(c == 1 for c in counts):
        return routing
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    return routing.select(owner)
