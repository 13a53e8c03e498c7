"""The stages of the model thread: each runs a batch of payloads as one forward pass over the backbone.

The service's batcher calls them with its batches; golden records (`adapters/golden.py`) run their probes
through them too, so the code that serves requests is the code every record checks.

A stage has three named hooks, run in order on one batch (`Stage.__call__`):
- `prepare(payloads)`: tokenise texts, pad and stack, move to the device (host work, one batch at a time);
- `forward(batch, routing)`: the backbone's own task functions (`image_features`, `video_features`,
  `text_features`, `itm_logits`, `encode_multimodal` + the VQA decoders) with a per-sample `Routing`, so one
  batch serves many adapter sets, and the functions the parity tests check against transformers are the ones
  that serve requests;
- `finish(batch, outputs)`: results back to the host in one transfer per batch, one result per job.

Payloads carry raw text: tokenising happens here, never on the event loop. Media arrive decoded and at model
size (`VisionInput`, built in worker threads under the decode budget).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import torch
from transformers import BlipConfig

from uniadapter_serve.model.backbone import BlipBackbone, text_config, vision_config
from uniadapter_serve.model.preprocess import normalize
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import CAPTION_WORDS, QUESTION_WORDS, BlipTokenizer, clean_text
from uniadapter_serve.model.vqa import RankScore, beam_search_answers, generate_answers, rank_answers

P = TypeVar("P")  # a job's payload
B = TypeVar("B")  # a prepared batch
Out = TypeVar("Out")  # what forward computed (on the device)


# -- payloads and results ----------------------------------------------------------------------------------

@dataclass
class VisionInput:
    """An image or a clip at model size, decoded and preprocessed outside the model thread."""

    pixels: torch.Tensor
    """(T, 3, S, S): one frame for an image, T frames for a video. uint8 RGB at model size as decoded (what
    uploads carry: a quarter of float32's bytes to pickle and copy; the stage normalises on the device), or
    float already normalised (`preprocess.image_to_tensor`: probes, tools, tests)."""
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
    text: str
    """a caption or query, as the user wrote it (cleaned and tokenised by the stage, [CLS] first)"""


@dataclass
class MatchInput:
    text: str
    """tokenised by the stage, [ENC] first"""
    states: torch.Tensor
    """(N, D) visual states from the vision stage"""
    text_embedding: torch.Tensor | None = None
    """(E,) the text's ITC embedding; with frame_embeddings it drives frame-aware attention"""
    frame_embeddings: torch.Tensor | None = None
    tokens_per_frame: int = 0


class RankGroup(NamedTuple):
    """Rank-mode jobs that run together: the same candidate list, k and score (a job's answers never depend on
    its batch)."""

    candidates: int
    """id() of the shared (ids, mask) tensors of the list"""
    k: int
    score: RankScore


class GenerateGroup(NamedTuple):
    """Generate-mode jobs that run together: the same beam width."""

    num_beams: int


@dataclass
class RankPlan:
    candidates: tuple[torch.Tensor, torch.Tensor]
    """(C, A) answer ids and mask ([DEC] first), one tuple per list, so every job sharing it batches together"""
    k: int
    """candidates kept by the first-token pruning and scored in full (decided by `SetLimits.rank_k`)"""
    top_k: int
    """answers returned (<= k)"""
    score: RankScore = "likelihood"

    @property
    def group(self) -> RankGroup:
        return RankGroup(id(self.candidates), self.k, self.score)

    @property
    def rows(self) -> int:
        return self.k  # about k decoder rows per step (its prefix tree)


@dataclass
class GeneratePlan:
    max_length: int = 10
    num_beams: int = 1
    """1 = greedy, else beam search"""
    top_k: int = 1
    """answers returned (<= num_beams)"""

    @property
    def group(self) -> GenerateGroup:
        return GenerateGroup(self.num_beams)

    @property
    def rows(self) -> int:
        return self.num_beams


@dataclass
class AnswerInput:
    question: str
    """tokenised by the stage, [ENC] first"""
    states: torch.Tensor
    plan: RankPlan | GeneratePlan


@dataclass
class AnswerOutput:
    indices: list[int] | None
    """rank mode: candidate indices, best first"""
    texts: list[str] | None
    """generate mode: the answers, decoded, best first (one, or one per beam)"""
    scores: list[float]
    """log-likelihood (or rank score) of each answer"""


# -- the stages ----------------------------------------------------------------------------------------------

class Stage(abc.ABC, Generic[P, B, Out]):
    """One stage of the model thread; the batcher calls it with its jobs' payloads and their routing."""

    name: ClassVar[str]
    kind: ClassVar[str] = "unit"
    """what `difference` measures, a kind of `adapters/golden.TOLERANCES`: "unit" (unit vectors, or relative for
    states), "prob" (ITM probabilities) or "logp" (answer scores)"""

    def __init__(self, backbone: BlipBackbone, tokenizer: BlipTokenizer) -> None:
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.device = backbone.device

    def __call__(self, payloads: Sequence[P], routing: Routing) -> list[Any]:
        batch = self.prepare(list(payloads))
        return self.finish(batch, self.forward(batch, routing))

    @abc.abstractmethod
    def prepare(self, payloads: list[P]) -> B:
        """Host side: tokenise, pad, stack, move to the device."""

    @abc.abstractmethod
    def forward(self, batch: B, routing: Routing) -> Out:
        """The backbone's forward pass over the whole batch."""

    @abc.abstractmethod
    def finish(self, batch: B, outputs: Out) -> list[Any]:
        """One result per job, on the host (one transfer per batch)."""

    @abc.abstractmethod
    def difference(self, batched: Any, alone: Any) -> float:
        """How far a job's result in a batch is from its result computed alone (the live self-check)."""

    @classmethod
    @abc.abstractmethod
    def macs(cls, config: BlipConfig, payloads: Sequence[P]) -> float:
        """Multiply-adds of one forward step of a batch of `payloads` (a whole pass for the encoders, one decoding
        step for answers): whether the batch has the work to split across intra-op threads."""

    def _tokens(self, texts: Sequence[str], words: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cleaned and tokenised on the host, to the device; the mask is None when every row has the same length
        (attention then runs without one)."""
        ids, mask = self.tokenizer.encode([clean_text(t, words) for t in texts],
                                          mode="multimodal" if mode == "multimodal" else "text")
        full = bool(mask.all())
        return ids.to(self.device), None if full else mask.to(self.device, non_blocking=True)


def text_macs(config: BlipConfig, texts: Sequence[str], factor: float = 1.0) -> float:
    tc = text_config(config)
    layer = 12.0 * tc.hidden_size ** 2 * tc.num_hidden_layers
    return sum(estimated_tokens(t) for t in texts) * layer * factor


def estimated_tokens(text: str, limit: int = 35) -> int:
    """Tokens of a text before it is tokenised (words + [CLS]/[SEP], capped at the tokenizer's usual 35): enough
    to size a batch's threads."""
    return min(limit, len(text.split()) + 2)


@dataclass
class _Frames:
    inputs: list[VisionInput]
    frames: torch.Tensor
    """(sum T, 3, S, S) every job's frames, on the device"""
    counts: list[int]


@dataclass
class _Seen:
    states: list[torch.Tensor]
    """per job: (N, D) or (T*N, D)"""
    embeddings: dict[int, torch.Tensor]
    """job -> (E,) on the device (jobs that asked for one)"""
    frame_embeddings: dict[int, torch.Tensor]
    tokens_per_frame: list[int]


class VisionStage(Stage[VisionInput, _Frames, _Seen]):
    """Images and clips, mixed in one pass over the adapted ViT: each frame is a row routed to its job's set."""

    name = "vision"

    def prepare(self, payloads: list[VisionInput]) -> _Frames:
        raw = [x.pixels.dtype == torch.uint8 for x in payloads]
        if all(raw) or not any(raw):
            host = torch.cat([x.pixels for x in payloads])  # (sum T, 3, S, S) uint8, or normalised floats
        else:  # uint8 uploads beside float probes (rare): those normalised here, the same numbers
            host = torch.cat([normalize(x.pixels) if r else x.pixels for x, r in zip(payloads, raw, strict=True)])
        if self.device.type == "cuda":
            host = host.pin_memory()  # page-locked: the copy overlaps with queued GPU work
        if host.dtype == torch.uint8:  # a quarter of the bytes over the bus; normalised on the device
            frames = normalize(host.to(self.device, non_blocking=True), self.backbone.dtype)
        else:
            frames = host.to(self.device, self.backbone.dtype, non_blocking=True)
        return _Frames(payloads, frames, [x.pixels.shape[0] for x in payloads])

    def forward(self, batch: _Frames, routing: Routing) -> _Seen:
        b = self.backbone
        tokens = b.encode_image(batch.frames, _per_frame(routing, batch.counts, self.device))  # (sum T, N, D)
        per_job = tokens.split(batch.counts)
        seen = _Seen([t[0] for t in per_job], {}, {}, [0] * len(per_job))
        images = [i for i, x in enumerate(batch.inputs) if not x.video]
        wanted = [i for i in images if batch.inputs[i].embed]
        if wanted:  # images: the [CLS] token, projected and normalised
            rows = self._select(routing, wanted, len(per_job))
            every = len(wanted) == len(per_job)  # all images (one frame each): the [CLS] rows as they are
            cls = tokens[:, :1] if every else torch.stack([per_job[i][0, :1] for i in wanted])  # (B', 1, D)
            for i, e in zip(wanted, b.image_features(cls, rows), strict=True):
                seen.embeddings[i] = e
        clips: dict[int, list[int]] = {}
        for i, x in enumerate(batch.inputs):
            if x.video:
                clips.setdefault(batch.counts[i], []).append(i)
        for rows_of in clips.values():  # clips of one length run together through the video functions
            rows = self._select(routing, rows_of, len(per_job))
            stacked = torch.stack([per_job[i] for i in rows_of])  # (B', T, N, D)
            for i, states in zip(rows_of, b.video_states(stacked, rows), strict=True):
                seen.states[i] = states
                seen.tokens_per_frame[i] = stacked.shape[2]
            embed = [n for n, i in enumerate(rows_of) if batch.inputs[i].embed]
            if not embed:
                continue
            sub = stacked if len(embed) == len(rows_of) else stacked[embed]
            sub_rows = rows if len(embed) == len(rows_of) else rows.select(torch.tensor(embed, device=self.device))
            for n, e in zip(embed, b.video_features(sub, sub_rows), strict=True):
                seen.embeddings[rows_of[n]] = e
            aware = [m for m in range(len(embed)) if _frame_aware(sub_rows, m, self.device)]
            if aware:
                picked = torch.tensor(aware, device=self.device)
                for m, f in zip(aware, b.frame_embeddings(sub.index_select(0, picked), sub_rows.select(picked)),
                                strict=True):
                    seen.frame_embeddings[rows_of[embed[m]]] = f
        return seen

    def finish(self, batch: _Frames, outputs: _Seen) -> list[Any]:
        keys = sorted(outputs.embeddings)
        frame_keys = sorted(outputs.frame_embeddings)
        host = to_host(*(outputs.embeddings[i] for i in keys), *(outputs.frame_embeddings[i] for i in frame_keys))
        embeddings = dict(zip(keys, host[: len(keys)], strict=True))
        per_frame = dict(zip(frame_keys, host[len(keys):], strict=True))
        return [VisionOutput(states=s, embedding=embeddings.get(i), frame_embeddings=per_frame.get(i),
                             tokens_per_frame=outputs.tokens_per_frame[i]) for i, s in enumerate(outputs.states)]

    def difference(self, batched: VisionOutput, alone: VisionOutput) -> float:
        d = relative_difference(batched.states, alone.states)
        if batched.embedding is not None and alone.embedding is not None:
            d = max(d, float((batched.embedding - alone.embedding).abs().max()))
        return d

    @classmethod
    def macs(cls, config: BlipConfig, payloads: Sequence[VisionInput]) -> float:
        return vision_macs(config, sum(int(p.pixels.shape[0]) for p in payloads))

    def _select(self, routing: Routing, rows: list[int], total: int) -> Routing:
        if len(rows) == total:
            return routing
        return routing.select(torch.tensor(rows, device=self.device))


def vision_macs(config: BlipConfig, frames: int) -> float:
    vc = vision_config(config)
    patches = (int(vc.image_size) // int(vc.patch_size)) ** 2 + 1  # type: ignore[arg-type]
    return frames * patches * 12.0 * vc.hidden_size ** 2 * vc.num_hidden_layers


class TextStage(Stage[TextInput, tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]):
    """ITC text embeddings ([CLS] first)."""

    name = "text"

    def prepare(self, payloads: list[TextInput]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._tokens([p.text for p in payloads], CAPTION_WORDS, "text")

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor | None], routing: Routing) -> torch.Tensor:
        return self.backbone.text_features(batch[0], batch[1], routing)

    def finish(self, batch: tuple[torch.Tensor, torch.Tensor | None], outputs: torch.Tensor) -> list[Any]:
        (host,) = to_host(outputs)
        return list(host)

    def difference(self, batched: torch.Tensor, alone: torch.Tensor) -> float:
        return float((batched - alone).abs().max())

    @classmethod
    def macs(cls, config: BlipConfig, payloads: Sequence[TextInput]) -> float:
        return text_macs(config, [p.text for p in payloads])


@dataclass
class _Pairs:
    ids: torch.Tensor
    mask: torch.Tensor | None
    states: torch.Tensor
    states_mask: torch.Tensor | None
    key_scale: torch.Tensor | None


class MatchStage(Stage[MatchInput, _Pairs, torch.Tensor]):
    """ITM: a text ([ENC] first) cross-attending to an image's or clip's states -> match probability; for sets
    with frame-aware attention, the clip's frames weighted by their similarity to the text."""

    name = "itm"
    kind = "prob"

    def prepare(self, payloads: list[MatchInput]) -> _Pairs:
        ids, mask = self._tokens([p.text for p in payloads], CAPTION_WORDS, "multimodal")
        states, states_mask = pad_stack([p.states for p in payloads])
        return _Pairs(ids, mask, states, states_mask, None)

    def forward(self, batch: _Pairs, routing: Routing) -> torch.Tensor:
        """-> (B,) float32 log-odds of a match (logit[match] - logit[no match]); `finish` makes them
        probabilities."""
        logits = self.backbone.itm_logits(batch.ids, batch.mask, batch.states, routing, states_mask=batch.states_mask,
                                          key_scale=batch.key_scale).float()
        return logits[:, 1] - logits[:, 0]

    def __call__(self, payloads: Sequence[MatchInput], routing: Routing) -> list[Any]:
        batch = self._prepared(payloads, routing)
        return self.finish(batch, self.forward(batch, routing))

    def log_odds(self, payloads: Sequence[MatchInput], routing: Routing) -> list[float]:
        """The match log-odds themselves (golden records keep these: a probability near 0 or 1 hides changes)."""
        batch = self._prepared(payloads, routing)
        (odds,) = to_host(self.forward(batch, routing))
        return list(odds.tolist())

    def _prepared(self, payloads: Sequence[MatchInput], routing: Routing) -> _Pairs:
        batch = self.prepare(list(payloads))
        batch.key_scale = self._frame_aware_scale(list(payloads), routing, batch.states.shape[1])
        return batch

    def finish(self, batch: _Pairs, outputs: torch.Tensor) -> list[Any]:
        (odds,) = to_host(outputs)
        return list(torch.sigmoid(odds).tolist())

    def difference(self, batched: float, alone: float) -> float:
        return abs(batched - alone)

    @classmethod
    def macs(cls, config: BlipConfig, payloads: Sequence[MatchInput]) -> float:
        return text_macs(config, [p.text for p in payloads], 4 / 3)

    def _frame_aware_scale(self, inputs: list[MatchInput], routing: Routing, width: int) -> torch.Tensor | None:
        """(B, width) key weights for the clips whose set enables frame-aware attention; None if none do."""
        scale: torch.Tensor | None = None
        for i, x in enumerate(inputs):
            if x.frame_embeddings is None or x.text_embedding is None:
                continue
            row = routing.select(torch.tensor([i], device=self.device))
            weights = self.backbone.frame_aware_scale(x.text_embedding[None].to(self.device),
                                                      x.frame_embeddings[None].to(self.device), x.tokens_per_frame,
                                                      row)
            if weights is None:
                continue
            if scale is None:
                scale = torch.ones(len(inputs), width, device=self.device)
            scale[i, : weights.shape[1]] = weights[0]
        return scale


@dataclass
class _Questions:
    plans: list[RankPlan | GeneratePlan]
    ids: torch.Tensor
    mask: torch.Tensor | None
    """(B, Q) question mask; None when every question has the same length"""
    states: torch.Tensor
    states_mask: torch.Tensor | None


@dataclass
class _Group:
    plan: RankPlan | GeneratePlan
    rows: list[int]
    first: torch.Tensor
    """rank: candidate indices (B', k); generate: answer ids (B', beams, L)"""
    scores: torch.Tensor
    """(B', k) or (B', beams)"""


class AnswerStage(Stage[AnswerInput, _Questions, list[_Group]]):
    """VQA answers: the question ([ENC] first) encoded against the visual states, then the answer decoder ranks
    the set's answer list or generates. Jobs run in groups that share a plan's shape (`RankGroup`,
    `GenerateGroup`); every group's results come back in one transfer."""

    name = "answer"
    kind = "logp"

    def prepare(self, payloads: list[AnswerInput]) -> _Questions:
        ids, mask = self._tokens([p.question for p in payloads], QUESTION_WORDS, "multimodal")
        states, states_mask = pad_stack([p.states for p in payloads])
        return _Questions([p.plan for p in payloads], ids, mask, states, states_mask)

    def forward(self, batch: _Questions, routing: Routing) -> list[_Group]:
        b, tok = self.backbone, self.tokenizer
        question = b.encode_multimodal(batch.ids, batch.mask, batch.states, batch.states_mask, routing)  # (B, Q, D)
        # the decoder needs a question mask: ones where every question has the same length
        mask = batch.mask if batch.mask is not None else torch.ones_like(batch.ids)
        groups: dict[RankGroup | GenerateGroup, list[int]] = {}
        for i, plan in enumerate(batch.plans):
            groups.setdefault(plan.group, []).append(i)
        out: list[_Group] = []
        for key, rows in groups.items():
            index = torch.tensor(rows, device=self.device)
            sub = routing.select(index)
            q, qmask = question.index_select(0, index), mask.index_select(0, index)
            plan = batch.plans[rows[0]]
            if isinstance(key, GenerateGroup):
                longest = max(p.max_length for p in (batch.plans[i] for i in rows) if isinstance(p, GeneratePlan))
                if key.num_beams == 1:
                    ids, scores = generate_answers(b, q, qmask, tok.dec_id, tok.sep_id, tok.pad_id, longest, sub)
                    out.append(_Group(plan, rows, ids[:, None], scores[:, None]))  # (B', 1, L), (B', 1)
                else:
                    beams = beam_search_answers(b, q, qmask, tok.dec_id, tok.sep_id, tok.pad_id, key.num_beams,
                                                longest, sub)
                    out.append(_Group(plan, rows, beams.ids, beams.scores))
            else:
                assert isinstance(plan, RankPlan)
                cand_ids, cand_mask = plan.candidates
                ranked = rank_answers(b, q, qmask, cand_ids.to(self.device), cand_mask.to(self.device), key.k, sub,
                                      score=key.score)
                out.append(_Group(plan, rows, ranked.indices, ranked.scores))
        return out

    def finish(self, batch: _Questions, outputs: list[_Group]) -> list[Any]:
        host = iter(to_host(*(t for g in outputs for t in (g.first, g.scores))))  # one transfer for every group
        results: list[Any] = [None] * len(batch.plans)
        for group in outputs:
            first, scores = next(host), next(host)
            for row, i in enumerate(group.rows):
                top = batch.plans[i].top_k
                if isinstance(group.plan, RankPlan):
                    results[i] = AnswerOutput(first[row, :top].tolist(), None, scores[row, :top].tolist())
                else:
                    results[i] = AnswerOutput(None, [self.tokenizer.decode(t) for t in first[row, :top]],
                                              scores[row, :top].tolist())
        return results

    def difference(self, batched: AnswerOutput, alone: AnswerOutput) -> float:
        """The answers' scores, best first (near-tied answers may swap places; their scores do not move)."""
        if len(batched.scores) != len(alone.scores):
            return float("inf")
        return max((abs(a - b) for a, b in zip(batched.scores, alone.scores, strict=True)), default=0.0)

    @classmethod
    def macs(cls, config: BlipConfig, payloads: Sequence[AnswerInput]) -> float:
        tc = text_config(config)
        layer = 12.0 * tc.hidden_size ** 2 * tc.num_hidden_layers
        # decoding steps dominate: one row per beam, about k rows (its prefix tree) for rank
        return sum(p.plan.rows for p in payloads) * (layer * 4 / 3 + tc.vocab_size * tc.hidden_size)


STAGES: tuple[type[Stage[Any, Any, Any]], ...] = (VisionStage, TextStage, MatchStage, AnswerStage)


def make_stages(backbone: BlipBackbone, tokenizer: BlipTokenizer) -> dict[str, Stage[Any, Any, Any]]:
    """The model thread's stages by name, as the batcher runs them."""
    return {cls.name: cls(backbone, tokenizer) for cls in STAGES}


# -- helpers -------------------------------------------------------------------------------------------------

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


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (hidden states have no fixed scale); inf when the shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def to_host(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Results go back to the host once per batch, in the model thread (never a sync per row, and never
    on the event loop): one call per stage."""
    return [t.detach().cpu() for t in tensors]


def _frame_aware(routing: Routing, row: int, device: torch.device) -> bool:
    """Whether row `row` is served by a set with frame-aware attention."""
    if not any(r.adapter.config.frame_aware_attention for r in routing.routes):
        return False  # decided on the host
    return any(r.adapter.config.frame_aware_attention
               for r in routing.select(torch.tensor([row], device=device)).routes)


def _per_frame(routing: Routing, counts: list[int], device: torch.device) -> Routing:
    """Routing over frames: job i's set serves its counts[i] frames."""
    if all(c == 1 for c in counts):
        return routing
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    return routing.select(owner)
