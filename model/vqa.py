"""VQA answer paths on top of the backbone: score answers, rank a candidate list, generate.

All functions take question states already encoded by `BlipBackbone.encode_multimodal`
and a `Routing` for the batch, so one call can serve questions for different adapter sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.routing import Routing


def answer_log_likelihood(backbone: BlipBackbone, question_states: torch.Tensor, question_mask: torch.Tensor,
                          answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                          routing: Routing | None = None) -> torch.Tensor:
    """Sum of log p(token) over each answer's tokens after the BOS ([DEC]) token.

    question_states: (B, Q, D); answer_ids/mask: (B, L) starting with BOS -> (B,)
    """
    logits = backbone.decoder_logits(answer_ids, answer_mask, question_states, question_mask, routing)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, L-1, V)
    target = answer_ids[:, 1:]
    token_logp = logp.gather(-1, target[..., None]).squeeze(-1)  # (B, L-1)
    return (token_logp * answer_mask[:, 1:].to(token_logp.dtype)).sum(dim=1)


@dataclass
class RankedAnswers:
    indices: torch.Tensor
    """(B, k) indices into the candidate list, best first."""
    scores: torch.Tensor
    """(B, k) answer log-likelihoods, descending."""


@torch.no_grad()
def rank_answers(backbone: BlipBackbone, question_states: torch.Tensor, question_mask: torch.Tensor,
                 candidate_ids: torch.Tensor, candidate_mask: torch.Tensor, k: int,
                 routing: Routing | None = None) -> RankedAnswers:
    """BLIP's `rank` mode: the first-token probabilities pick the top-k candidates, which are
    then scored in full; returns them best first.

    candidate_ids/mask: (C, L), each starting with BOS and ending with SEP.
    """
    B = question_states.shape[0]
    C = candidate_ids.shape[0]
    k = max(1, min(k, C))
    routing = routing or Routing.none(B)
    bos = candidate_ids[:1, :1].expand(B, 1)
    first_logits = backbone.decoder_logits(bos, None, question_states, question_mask, routing)[:, 0]
    first_logp = F.log_softmax(first_logits.float(), dim=-1)  # (B, V)
    first_scores = first_logp.index_select(1, candidate_ids[:, 1])  # (B, C)
    top = first_scores.topk(k, dim=1).indices  # (B, k)
    ids = candidate_ids[top.flatten()]  # (B*k, L)
    mask = candidate_mask[top.flatten()]
    states = question_states.repeat_interleave(k, dim=0)
    qmask = question_mask.repeat_interleave(k, dim=0)
    scores = answer_log_likelihood(backbone, states, qmask, ids, mask, routing.repeat_interleave(k)).view(B, k)
    order = scores.argsort(dim=1, descending=True)
    return RankedAnswers(indices=top.gather(1, order), scores=scores.gather(1, order))


@torch.no_grad()
def generate_answers(backbone: BlipBackbone, question_states: torch.Tensor, question_mask: torch.Tensor,
                     bos_token_id: int, eos_token_id: int, pad_token_id: int, max_length: int = 10,
                     routing: Routing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding, batched: -> (ids (B, <=max_length+1) with BOS first, log-likelihood (B,)).

    Answers are short (<= 10 tokens), so each step re-runs the decoder over the prefix
    instead of keeping a KV cache.
    """
    B = question_states.shape[0]
    routing = routing or Routing.none(B)
    ids = torch.full((B, 1), bos_token_id, dtype=torch.long, device=question_states.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    total = torch.zeros(B, dtype=torch.float32, device=ids.device)
    for _ in range(max_length):
        logits = backbone.decoder_logits(ids, None, question_states, question_mask, routing)[:, -1]
        logp = F.log_softmax(logits.float(), dim=-1)
        best_logp, nxt = logp.max(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        total = total + torch.where(done, torch.zeros_like(best_logp), best_logp)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done = done | (nxt == eos_token_id)
        if bool(done.all()):
            break
    return ids, total
