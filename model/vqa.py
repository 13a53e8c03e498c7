"""VQA answer paths on top of the backbone: score answers, rank a candidate list, generate.

All functions take question states already encoded by `BlipBackbone.encode_multimodal`
and a `Routing` for the batch, so one call can serve questions for different adapter sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.text import DecoderCache


def answer_log_likelihood(backbone: BlipBackbone, question_states: torch.Tensor, question_mask: torch.Tensor,
                          answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                          routing: Routing | None = None) -> torch.Tensor:
    """Sum of log p(token) over each answer's tokens after the BOS ([DEC]) token.

    question_states: (B, Q, D); answer_ids/mask: (B, L) starting with BOS -> (B,)
    """
    logits = backbone.decoder_logits(answer_ids, answer_mask, question_states, question_mask, routing)
    return _sequence_log_likelihood(logits, answer_ids, answer_mask)


RankScore = Literal["likelihood", "blip"]


@dataclass
class RankedAnswers:
    indices: torch.Tensor
    """(B, k) indices into the candidate list, best first."""
    scores: torch.Tensor
    """(B, k) answer log-likelihoods, descending."""


@torch.no_grad()
def rank_answers(backbone: BlipBackbone, question_states: torch.Tensor, question_mask: torch.Tensor,
                 candidate_ids: torch.Tensor, candidate_mask: torch.Tensor, k: int,
                 routing: Routing | None = None, score: RankScore = "likelihood") -> RankedAnswers:
    """BLIP's `rank` mode: the first-token probabilities pick the top-k candidates (BLIP and UniAdapter use
    k = 128), which are then scored in full; returns them best first.

    score: "likelihood", the answer's log-likelihood; "blip", BLIP's own ranking score, the negative
    label-smoothed (0.1) cross-entropy summed over the answer's tokens.

    candidate_ids/mask: (C, L), each starting with BOS and ending with SEP. The question's cross-attention
    K/V are computed once, by the first-token pass, and shared by its k candidates (broadcast, not copied
    k times), which are scored in one pass.
    """
    B = question_states.shape[0]
    C = candidate_ids.shape[0]
    if not 1 <= k <= C:
        raise ValueError(f"k = {k} candidates to score of a list of {C} (SetLimits.rank_k decides k)")
    routing = routing or Routing.none(B)
    cache = DecoderCache()
    bos = candidate_ids[:1, :1].expand(B, 1)
    first_logits = backbone.decoder_logits(bos, None, question_states, question_mask, routing, cache)[:, 0]
    first_logp = F.log_softmax(first_logits.float(), dim=-1)  # (B, V)
    first_scores = first_logp.index_select(1, candidate_ids[:, 1])  # (B, C)
    top = first_scores.topk(k, dim=1).indices  # (B, k)
    ids = candidate_ids[top.flatten()]  # (B*k, L), grouped by question
    mask = candidate_mask[top.flatten()]
    scores = _score_prefix_tree(backbone, cache, first_logp, routing, ids, mask, score).view(B, k)
    order = scores.argsort(dim=1, descending=True)
    return RankedAnswers(indices=top.gather(1, order), scores=scores.gather(1, order))


BLIP_LABEL_SMOOTHING = 0.1
"""BLIP's text decoder trains and ranks with label-smoothed cross-entropy"""


def _sequence_log_likelihood(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, V) logits of sequences ids (B, L) starting with BOS -> (B,) sum of log p of tokens 2..L."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logp * mask[:, 1:].to(token_logp.dtype)).sum(dim=1)

def _score_prefix_tree(backbone: BlipBackbone, cache: DecoderCache, first_logp: torch.Tensor, routing: Routing,
                       ids: torch.Tensor, mask: torch.Tensor, score: RankScore) -> torch.Tensor:
    """Score B questions' candidates (ids/mask (B*k, L), [DEC] first, grouped by question) one token position
    at a time over their prefix tree: a prefix that several candidates share runs through the decoder once,
    with the past self-attention K/V in `cache` (after the first pass, which scored position 1 already:
    `first_logp` (B, V)). -> (B*k,) scores.

    Candidates pruned by their first token share it by construction, so the tree is narrow: 128 answers of
    1-3 tokens cost about as many decoder tokens as they have distinct prefixes, not 128 x L."""
    B = first_logp.shape[0]
    N, L = ids.shape
    device = ids.device
    question = torch.arange(B, device=device).repeat_interleave(N // B)
    weight = mask.to(first_logp.dtype)

    def term(node_logp: torch.Tensor, node: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        picked = node_logp[node, token]
        if score == "blip":  # label smoothing spreads eps of the target over the vocabulary
            eps = BLIP_LABEL_SMOOTHING
            return (1 - eps) * picked + eps * node_logp.mean(dim=-1)[node]
        return picked

    vocab = first_logp.shape[1]
    total = term(first_logp, question, ids[:, 1]) * weight[:, 1]
    question_of_row = torch.arange(B, device=device)
    node = question  # each candidate's current prefix, as a row of the cache (the first pass: one per question)
    for j in range(2, L):
        need = mask[:, j].bool()
        wanted = need.nonzero().flatten()
        if wanted.numel() == 0:
            break
        # the distinct prefixes that must predict token j: (parent prefix's row, token j-1), one number each;
        # parent rows are laid out by question, so sorted prefixes are too
        keys, inverse = torch.unique(node[wanted] * vocab + ids[wanted, j - 1], return_inverse=True)
        parent, last = keys // vocab, keys % vocab
        owner_of = question_of_row[parent]
        # rows laid out g per question (the cross-attention K/V are broadcast per question); a question with
        # fewer prefixes repeats its last one, one with none borrows any (their outputs are never read)
        counts = torch.bincount(owner_of, minlength=B)
        g = int(counts.max())
        starts = counts.cumsum(0) - counts
        slot = torch.arange(g, device=device).repeat(B)
        owner = torch.arange(B, device=device).repeat_interleave(g)
        source = (starts[owner] + torch.minimum(slot, (counts[owner] - 1).clamp(min=0))).clamp(max=len(keys) - 1)
        cache.reorder(parent[source])
        logits = backbone.decoder_logits(last[source, None], None, None, None, routing.repeat_interleave(g),
                                         cache)[:, 0]
        row_of_prefix = owner_of * g + (torch.arange(len(keys), device=device) - starts[owner_of])
        question_of_row = owner
        node = torch.zeros_like(node)  # candidates that ended point at row 0; their step is masked out
        node[wanted] = row_of_prefix[inverse]
        step = term(F.log_softmax(logits.float(), dim=-1), node, ids[:, j])
        total = total + torch.where(need, step * weight[:, j], torch.zeros_like(step))
    return total



@torch.no_grad()
def generate_answers(backbone: BlipBackbone, question_states: torch.Tensor, question_mask: torch.Tensor,
                     bos_token_id: int, eos_token_id: int, pad_token_id: int, max_length: int = 10,
                     routing: Routing | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding, batched, with a KV cache (each step feeds one token; the question's cross K/V are
    computed once): -> (ids (B, <=max_length+1) with BOS first, log-likelihood (B,))."""
    B = question_states.shape[0]
    routing = routing or Routing.none(B)
    ids = torch.full((B, 1), bos_token_id, dtype=torch.long, device=question_states.device)
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    total = torch.zeros(B, dtype=torch.float32, device=ids.device)
    cache = DecoderCache()
    step: torch.Tensor = ids
    for _ in range(max_length):
        logits = backbone.decoder_logits(step, None, question_states if not cache.layers else None, question_mask,
                                         routing, cache)[:, -1]
        logp = F.log_softmax(logits.float(), dim=-1)
        best_logp, nxt = logp.max(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        total = total + torch.where(done, torch.zeros_like(best_logp), best_logp)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        step = nxt[:, None]
        done = done | (nxt == eos_token_id)
        if bool(done.all()):
            break
    return ids, total


@dataclass
class BeamAnswers:
    ids: torch.Tensor
    """(B, num_beams, L) finished hypotheses, best first, BOS first, pad after EOS"""
    scores: torch.Tensor
    """(B, num_beams) log-likelihood of each (the sum over its tokens, without the length penalty)"""


@torch.no_grad()
def beam_search_answers(backbone: BlipBackbone, question_states: torch.Tensor, question_mask: torch.Tensor,
                        bos_token_id: int, eos_token_id: int, pad_token_id: int, num_beams: int = 3,
                        max_length: int = 10, routing: Routing | None = None,
                        length_penalty: float = 1.0) -> BeamAnswers:
    """Beam search as BLIP and UniAdapter decode VQA answers (3 beams), with transformers' rules (its
    `generate(num_beams=...)` defaults: 2 x num_beams continuations kept per step, a hypothesis ranked by
    its log-likelihood / generated-length ** length_penalty, and the same stopping heuristic), so the same
    weights give the same answers. `max_length` counts generated tokens (EOS included).

    Batched: B questions x num_beams rows through the KV-cached decoder; the question's cross-attention K/V
    are computed once per question and broadcast across its beams.
    """
    B, nb = question_states.shape[0], num_beams
    device = question_states.device
    routing = routing or Routing.none(B)
    beam_routing = routing.repeat_interleave(nb)
    total_len = 1 + max_length
    neg = -1.0e9
    keep = 2 * nb  # continuations kept per question: enough that nb stay open after some end
    running = torch.full((B, nb, total_len), pad_token_id, dtype=torch.long, device=device)
    running[:, :, 0] = bos_token_id
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = neg  # the beams start identical: only the first one expands at step 1
    finished = running.clone()
    finished_scores = torch.full((B, nb), neg, device=device)
    finished_lengths = torch.ones(B, nb, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    top_nb = torch.arange(keep, device=device) < nb
    group_base = (torch.arange(B, device=device) * nb)[:, None]
    # step 1 on the B questions alone (every beam starts from the same BOS): it also computes the question's
    # cross-attention K/V, with the set's K/V deltas, once; the beams then share them
    cache = DecoderCache()
    first = backbone.decoder_logits(running[:, 0, :1], None, question_states, question_mask, routing, cache)
    cache.reorder(torch.arange(B, device=device).repeat_interleave(nb))
    logits = first[:, -1].repeat_interleave(nb, dim=0)
    for cur_len in range(1, total_len):
        logp = F.log_softmax(logits.float(), dim=-1)  # (B*nb, V)
        V = logp.shape[-1]
        acc = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        top_scores, top_index = acc.topk(keep, dim=1)  # (B, keep)
        source, token = top_index // V, top_index % V
        candidates = running.gather(1, source[:, :, None].expand(B, keep, total_len)).clone()
        candidates[:, :, cur_len] = token
        ends = (token == eos_token_id) | (cur_len + 1 >= total_len)
        # the best nb continuations that did not end stay open
        open_scores = top_scores + ends.float() * neg
        next_open = open_scores.topk(nb, dim=1).indices  # (B, nb)
        running = candidates.gather(1, next_open[:, :, None].expand(B, nb, total_len))
        running_scores = open_scores.gather(1, next_open)
        # the ended ones among the top nb join the finished hypotheses if they beat them
        gen_len = cur_len
        ranked = top_scores / (gen_len ** length_penalty)
        ranked = ranked + (~improvable).float() * neg + (~(ends & top_nb)).float() * neg
        merged_ids = torch.cat([finished, candidates], dim=1)
        merged_scores = torch.cat([finished_scores, ranked], dim=1)
        merged_lengths = torch.cat([finished_lengths, torch.full_like(ranked, gen_len, dtype=torch.long)], dim=1)
        merged_finished = torch.cat([is_finished, ends & top_nb], dim=1)
        best = merged_scores.topk(nb, dim=1).indices
        finished = merged_ids.gather(1, best[:, :, None].expand(B, nb, total_len))
        finished_scores = merged_scores.gather(1, best)
        finished_lengths = merged_lengths.gather(1, best)
        is_finished = merged_finished.gather(1, best)
        # the decoder continues each open beam from its source beam's past K/V
        cache.reorder((group_base + source.gather(1, next_open)).flatten())
        # can an open beam still beat the worst finished one? (transformers' heuristic, early_stopping=False)
        best_possible = running_scores[:, :1] / (cur_len ** length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, neg)
        improvable = improvable & (best_possible > worst).any(dim=1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()):
            break
        step = running[:, :, cur_len].reshape(B * nb, 1)
        logits = backbone.decoder_logits(step, None, None, None, beam_routing, cache)[:, -1]
    longest = int(finished_lengths.max())
    ids = finished[:, :, : 1 + longest]
    after_eos = torch.arange(1 + longest, device=device)[None, None, :] > finished_lengths[:, :, None]
    ids = ids.masked_fill(after_eos, pad_token_id)
    scores = finished_scores * finished_lengths.float() ** length_penalty
    return BeamAnswers(ids=ids, scores=scores)
