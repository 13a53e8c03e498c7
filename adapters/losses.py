"""BLIP's training objectives, on the backbone's task paths (any `Routing`, so the same code trains an
adapter set, the heads only, or the whole model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.routing import Routing


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, same: torch.Tensor, temp: float = 0.07) -> torch.Tensor:
    """Image-text contrastive loss. `same` (B, B) marks pairs that match (duplicate captions count as
    positives, like BLIP's idx-aware targets). Features are L2-normalised (B, E)."""
    logits = image_feat @ text_feat.T / temp  # (B, B)
    targets = same.float() / same.float().sum(dim=1, keepdim=True)
    i2t = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    t2i = -(F.log_softmax(logits.T, dim=1) * targets.T).sum(dim=1).mean()
    return (i2t + t2i) / 2


def itm_loss(backbone: BlipBackbone, image_tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
             image_feat: torch.Tensor, text_feat: torch.Tensor, same: torch.Tensor, routing: Routing,
             enc_id: int) -> torch.Tensor:
    """Image-text matching with one hard negative text per image and one hard negative image per text,
    drawn from the ITC similarities (BLIP's recipe); labels 1 for B positives, 0 for 2B negatives."""
    B = ids.shape[0]
    mm_ids = ids.clone()
    mm_ids[:, 0] = enc_id
    with torch.no_grad():
        sims = image_feat @ text_feat.T
        weights = F.softmax(sims.float() / 0.07, dim=1).masked_fill(same, 0) + 1e-6
        neg_text = torch.multinomial(weights, 1).squeeze(1)  # for each image, a hard negative text
        neg_image = torch.multinomial(weights.T.contiguous(), 1).squeeze(1)  # for each text, a hard negative image
    idx = torch.arange(B, device=ids.device)
    image_rows = torch.cat([idx, idx, neg_image])
    text_rows = torch.cat([idx, neg_text, idx])
    rep = Routing.none(3 * B) if routing.is_bare else routing.select(image_rows)
    logits = backbone.itm_logits(mm_ids[text_rows], mask[text_rows], image_tokens[image_rows], rep)
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(ids.device)
    return F.cross_entropy(logits, labels)


def lm_loss(backbone: BlipBackbone, ids: torch.Tensor, mask: torch.Tensor, states: torch.Tensor,
            states_mask: torch.Tensor | None, routing: Routing, bos_id: int,
            label_smoothing: float = 0.1) -> torch.Tensor:
    """Answer / caption language-modelling loss: [DEC] text [SEP], next-token CE with label smoothing."""
    dec = ids.clone()
    dec[:, 0] = bos_id
    logits = backbone.decoder_logits(dec, mask, states, states_mask, routing)  # (B, L, V)
    targets = dec[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=-100, label_smoothing=label_smoothing)


class LayoutHeads(torch.nn.Module):
    """Pre-training's layout objective (demo): from the image [CLS] state, the shapes' centres left to right
    (up to `max_shapes`); from every patch state, where that patch is. Position is asked of the vision tower
    without a word of it in any caption; the heads are dropped after pre-training."""

    def __init__(self, hidden: int, grid: int, max_shapes: int = 2) -> None:
        super().__init__()
        self.grid, self.max_shapes = grid, max_shapes
        self.shapes = torch.nn.Linear(hidden, 2 * max_shapes)
        self.patches = torch.nn.Linear(hidden, 2)

    def loss(self, tokens: torch.Tensor, layouts: list[tuple[tuple[float, float], ...]]) -> torch.Tensor:
        """tokens (B, 1 + grid^2, H) from `encode_image`; layouts: per image, its shapes' (x, y), left to right."""
        B = tokens.shape[0]
        target = torch.zeros(B, self.max_shapes, 2, device=tokens.device)
        present = torch.zeros(B, self.max_shapes, device=tokens.device)
        for i, layout in enumerate(layouts):
            for j, (x, y) in enumerate(layout[: self.max_shapes]):
                target[i, j] = torch.tensor((x, y))
                present[i, j] = 1.0
        guess = self.shapes(tokens[:, 0].float()).view(B, self.max_shapes, 2)
        shapes = (((guess - target) ** 2).sum(-1) * present).sum() / present.sum().clamp(min=1)
        rows, cols = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        where = (torch.stack([cols, rows], -1).reshape(1, -1, 2).float() + 0.5) / self.grid  # (1, P, 2): x, y
        patches = ((self.patches(tokens[:, 1:].float()) - where.to(tokens.device)) ** 2).sum(-1).mean()
        return shapes + patches


class GroundingHead(torch.nn.Module):
    """Pre-training's grounding objective (demo; X-VLM's box prediction in miniature, on the path a VQA answer
    takes): a phrase naming one shape of the image ("a red circle") cross-attends to the image tokens, the answer
    decoder's first state cross-attends to the phrase's states, and both the phrase's multimodal [CLS] state
    (`encoder`) and that decoder state (`decoder`) say where the shape is: which of `grid` columns and which of
    `grid` rows holds its centre (cross-entropies, ln(grid) each at chance, so it weighs like the other
    objectives). The layout objective keeps position in the image tokens; this carries it through both
    cross-attentions a question's answer goes through, which otherwise pass almost none of it (the decoder's first
    state hardly varies across images: `bench/vqa_side.py`). No caption names a side or a relation; the heads are
    dropped after pre-training."""

    def __init__(self, hidden: int, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.encoder = torch.nn.Linear(hidden, 2 * grid)
        self.decoder = torch.nn.Linear(hidden, 2 * grid)

    def cells(self, centres: torch.Tensor) -> torch.Tensor:
        """(B, 2) x, y in 0..1 -> (B, 2) column, row."""
        return (centres * self.grid).long().clamp(0, self.grid - 1)

    def loss(self, question_cls: torch.Tensor, decoder_first: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        """question_cls, decoder_first (B, H); centres (B, 2): the named shapes' x, y in 0..1."""
        target = self.cells(centres).reshape(-1)
        return sum((F.cross_entropy(head(state.float()).view(-1, self.grid), target)
                    for head, state in ((self.encoder, question_cls), (self.decoder, decoder_first))),
                   torch.zeros((), device=centres.device))
