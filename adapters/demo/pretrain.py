"""Pre-train the tiny demo BLIP on still scenes with BLIP's objectives: ITC, ITM and captioning LM.

Reproducible from a seed: `python -m uniadapter_serve.adapters.demo.build` runs it (and trains the
demo adapter sets). Position embeddings start at std 0.5, not transformers' 1e-10, so position is
learnable in a small model trained from scratch. With `layout_weight` > 0, a layout objective (`LayoutHeads`: the
shapes' centres from the image [CLS], each patch's place from its state) keeps position in the vision tower
without naming it in a caption; its heads are dropped after pre-training. With `grounding_weight` > 0, a
grounding objective (`GroundingHead`: a phrase naming one of the image's shapes cross-attends to the image, the
answer decoder's first state to the phrase, and both say where that shape is) carries position along the path a
VQA answer takes. With `group_draw` > 1, each scene drawn brings `group_draw` - 1 others of its family (the same
shapes and colours in another layout) into the batch, so ITC's and ITM's negatives include scenes that differ only in
where each shape is: with captions that name the shapes left to right, telling them apart takes binding each shape
to its place.
"""

from __future__ import annotations

import random
import time

import torch
from tqdm import tqdm

from uniadapter_serve.adapters.datasets import ImageText
from uniadapter_serve.adapters.losses import GroundingHead, LayoutHeads, itc_loss, itm_loss, lm_loss
from uniadapter_serve.adapters.training import GroupSampler, optimize, warmup_cosine
from uniadapter_serve.model.backbone import BlipBackbone, text_config, vision_config
from uniadapter_serve.model.loading import load_config, random_backbone
from uniadapter_serve.model.preprocess import array_to_tensor
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text


def new_demo_backbone(seed: int = 0) -> BlipBackbone:
    model = random_backbone(load_config("blip-demo"), seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        pos = model.vision_model.embeddings.position_embedding
        pos.copy_(torch.randn(pos.shape, generator=gen) * 0.5)
    return model


def pretrain(data: list[ImageText], tokenizer: BlipTokenizer, *, steps: int, batch_size: int = 64, lr: float = 5e-4,
             seed: int = 0, time_budget_s: float | None = None, layout_weight: float = 0.0,
             grounding_weight: float = 0.0, group_draw: int = 1,
             progress: bool = True) -> tuple[BlipBackbone, list[float]]:
    if group_draw < 1:
        raise ValueError("group_draw must be at least 1")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    sampler = GroupSampler(data, group_draw)  # group_draw 1: the plain uniform draws of earlier builds
    model = new_demo_backbone(seed)
    model.train()
    model.requires_grad_(True)
    params = list(model.parameters())
    vision = vision_config(model.config)
    grid = int(vision.image_size) // int(vision.patch_size)  # type: ignore[arg-type]
    heads = grounding = None
    if layout_weight > 0:
        heads = LayoutHeads(int(vision.hidden_size), grid)
        params += list(heads.parameters())
    if grounding_weight > 0:
        if any(not it.regions for it in data):
            raise ValueError("the grounding objective needs each item's regions (ImageText.regions)")
        grounding = GroundingHead(int(text_config(model.config).hidden_size), grid)
        params += list(grounding.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    schedule = warmup_cosine(optimizer, steps, warmup=100)
    images = [array_to_tensor(it.image) for it in data]  # type: ignore[arg-type]
    losses: list[float] = []
    started = time.monotonic()
    with tqdm(total=steps, disable=not progress, desc="pretrain") as bar:
        for _ in range(steps):
            idx = sampler.indices(rng, batch_size)
            items = [data[i] for i in idx]
            px = torch.stack([images[i] for i in idx])
            captions = [clean_text(it.captions[0], 30) for it in items]
            ids, mask = tokenizer.encode(captions, mode="text")
            same = torch.tensor([[a.key == b.key for b in items] for a in items])
            bare = Routing.none(batch_size)
            tokens = model.encode_image(px, bare)
            image_feat = model.image_features(tokens, bare)
            text_feat = model.text_features(ids, mask, bare)
            loss_itc = itc_loss(image_feat, text_feat, same)
            loss_itm = itm_loss(model, tokens, ids, mask, image_feat.detach(), text_feat.detach(), same, bare,
                                tokenizer.enc_id)
            loss_lm = lm_loss(model, ids, mask, tokens, None, bare, tokenizer.dec_id)
            loss = loss_itc + loss_itm + loss_lm
            if heads is not None:
                loss = loss + layout_weight * heads.loss(tokens, [it.layout for it in items])
            if grounding is not None:
                named = [rng.choice(it.regions) for it in items]
                g_ids, g_mask = tokenizer.encode([clean_text(f"a {phrase}", 30) for phrase, _, _ in named],
                                                 mode="multimodal")
                states = model.encode_multimodal(g_ids, g_mask, tokens, None, bare)
                first = model.decoder_states(torch.full((batch_size, 1), tokenizer.dec_id), None, states, g_mask,
                                             bare)
                loss = loss + grounding_weight * grounding.loss(states[:, 0], first[:, 0],
                                                                torch.tensor([(x, y) for _, x, y in named]))
            losses.append(optimize(loss, optimizer, schedule, params))
            bar.update(1)
            bar.set_postfix(itc=f"{loss_itc.item():.2f}", itm=f"{loss_itm.item():.2f}", lm=f"{loss_lm.item():.2f}")
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                break
    model.eval()
    model.requires_grad_(False)
    return model, losses

