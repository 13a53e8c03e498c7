"""Small deterministic builders shared by tests and benchmarks (no weights, no network)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from transformers import BlipConfig

from uniadapter_serve.model.backbone import BlipBackbone, text_config, vision_config
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, std: float = 0.1) -> nn.Module:
    """Fill every parameter with seeded noise (LayerNorm weights around 1), in place.

    Used so parity tests exercise every weight, including those a fresh init leaves at 0/1.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen) * std
        base = 1.0 if (name.endswith("weight") and p.dim() == 1) else 0.0
        p.copy_((noise + base).to(p.dtype))
    return module


M = TypeVar("M", bound=nn.Module)


def random_transformers_model(cls: Callable[[BlipConfig], M], config: BlipConfig, seed: int) -> M:
    """A transformers BLIP model (`BlipForImageTextRetrieval`, `BlipForQuestionAnswering`) with every weight
    seeded noise, in eval mode: the reference the parity tests compare against."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize_(model, seed=seed)
    return model


def random_adapter(backbone: BlipBackbone, config: UniAdapterConfig, seed: int, std: float = 0.1) -> AdapterSetModule:
    """An adapter set with every tensor random (non-zero up-projections)."""
    module = AdapterSetModule(config, backbone.dims)
    randomize_(module, seed, std)
    module.requires_grad_(False)
    return module.to(device=backbone.device, dtype=backbone.dtype).eval()


@dataclass
class Batch:
    pixel_values: torch.Tensor
    """(B, 3, S, S)"""
    input_ids: torch.Tensor
    """(B, L), [CLS]-like first token, right padding with 0"""
    attention_mask: torch.Tensor
    answer_ids: torch.Tensor
    """(B, A) starting with BOS"""
    answer_mask: torch.Tensor


def random_batch(backbone: BlipBackbone, batch_size: int, seed: int, text_len: int = 7, answer_len: int = 4) -> Batch:
    """Random pixels and token ids for `backbone`'s config, with ragged padding."""
    gen = torch.Generator().manual_seed(seed)
    vc, tc = vision_config(backbone.config), text_config(backbone.config)
    size = int(vc.image_size)  # type: ignore[arg-type]
    low = 4  # keep clear of pad/special ids
    pixels = torch.randn(batch_size, 3, size, size, generator=gen)
    ids = torch.randint(low, tc.vocab_size, (batch_size, text_len), generator=gen)
    mask = torch.ones(batch_size, text_len, dtype=torch.long)
    for i in range(batch_size):
        keep = text_len - (i % 3)
        mask[i, keep:] = 0
        ids[i, keep:] = tc.pad_token_id or 0
    answers = torch.randint(low, tc.vocab_size, (batch_size, answer_len), generator=gen)
    answers[:, 0] = tc.bos_token_id if tc.bos_token_id is not None else 1
    amask = torch.ones(batch_size, answer_len, dtype=torch.long)
    for i in range(batch_size):
        keep = answer_len - (i % 2)
        amask[i, keep:] = 0
        answers[i, keep:] = tc.pad_token_id or 0
    device = backbone.device
    return Batch(pixels.to(device), ids.to(device), mask.to(device), answers.to(device), amask.to(device))


def random_answer_list(config: BlipConfig, count: int, seed: int, random_lengths: bool = False,
                       width: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, width) answer ids `[DEC] t1..tn [SEP] pad...` with n in 1..3 (cycling with the row, or random)
    and their mask, as `BlipTokenizer.encode_answers` gives them: a candidate list for rank mode."""
    tc = text_config(config)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, tc.vocab_size, (count, width), generator=gen)
    bos, sep, pad = int(tc.bos_token_id or 1), int(tc.sep_token_id or 2), int(tc.pad_token_id or 0)
    ids[:, 0] = bos
    mask = torch.ones_like(ids)
    lengths = torch.randint(1, 4, (count,), generator=gen).tolist() if random_lengths else [
        1 + c % 3 for c in range(count)]
    for c, n in enumerate(lengths):
        ids[c, n + 1], ids[c, n + 2:], mask[c, n + 2:] = sep, pad, 0
    return ids, mask
