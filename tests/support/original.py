"""Checkpoints laid out exactly as the original BLIP / UniAdapter code saves them.

Keys and shapes come from the official key list, never from our own key map:
`tests/unit/converters/data/uniadapter-checkpoint-keys.json.gz` is a gzip of
`shared/reference/uniadapter-checkpoint-keys.json` (every key and shape of the `model` entry of the
four official UniAdapter checkpoint kinds, derived from the official model classes on the meta
device). BLIP's pre-trained `model_base.pth` is derived from it as `blip_pretrain.py` builds that
model (see `model_base_shapes`).

`shrink` maps the BLIP-base shapes to a tiny model by dimension value (no value stands for two
different things) and keeps the first layers, so the same keys can carry small random weights.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch

KEYS_FILE = Path(__file__).parents[1] / "unit" / "converters" / "data" / "uniadapter-checkpoint-keys.json.gz"
KINDS = ("retrieval_temporalFalse", "retrieval_temporalTrue", "vqa", "vqa_temporal")
TINY_DIMS = {
    768: 32,     # hidden width (ViT-B and BERT-base)
    2304: 96,    # the ViT's fused qkv (3 x hidden)
    3072: 64,    # FFN width
    30524: 128,  # vocabulary (BERT + [DEC], [ENC])
    512: 64,     # max text positions; also the adapter bottleneck
    256: 16,     # ITC embedding
    64: 4,       # K/V low-rank adapter dim
    16: 8,       # patch size
    577: 17,     # 1 + (384/16)^2 patch positions -> 1 + (32/8)^2
    901: 17,     # 1 + (480/16)^2 (VQA)
    197: 17,     # 1 + (224/16)^2 (pre-training)
    57600: 8,    # ITC queue length
}
"""BLIP-base dimension -> tiny dimension (1, 2, 3 and the 8 frames of time_embed stay). The tiny model
is blip-tiny's: hidden 32, 4 heads (give the converters 4: heads are not visible in shapes)."""
TINY_HEADS = {"vision_heads": 4, "text_heads": 4}

# The training configs the released code saves in `config` (configs/retrieval_coco.yaml, configs/vqa.yaml;
# the options a conversion reads, plus a few others it must ignore).
RETRIEVAL_CONFIG: dict[str, Any] = {
    "dataset": "coco", "vit": "base", "image_size": 384, "modality": "image", "adapter": True,
    "adapter_textual": True, "adapter_visual": True, "adapter_multimodal": "after_cross",
    "adapter_ffn_option": "parallel", "adapter_dim": 512, "frame_aware_attention": False,
    "video_key_adapter": True, "video_key_adapter_dim": 64, "temporal_embed": False, "temporal_attention": False,
    "queue_size": 57600, "k_test": 256, "negative_all_rank": True, "init_lr": "1e-5", "max_epoch": 6,
}
VQA_CONFIG: dict[str, Any] = {
    "dataset": "vqa", "vit": "base", "image_size": 480, "modality": "image", "adapter": True,
    "adapter_textual": True, "adapter_visual": True, "adapter_multimodal": True, "adapter_textual_dim": 512,
    "adapter_visual_dim": 512, "adapter_multi_modal_dim": 512, "video_semantic_adapter": False,
    "video_key_adapter": True, "video_key_adapter_dim": 64, "temporal_embed": False, "temporal_attention": False,
    "k_test": 128, "inference": "rank", "init_lr": "2e-5", "max_epoch": 10,
}

_SHARED = (  # one shared UniAdapter module, saved under each of these names (state_dict does not deduplicate)
    re.compile(r"^(?P<tower>adapters(?P<m>_m)?|visual_encoder(?P<m2>_m)?\.adapters)\.(?P<i>\d+)\.(?P<x>.+)$"),
    re.compile(r"^(?P<tower>visual_encoder(?P<m>_m)?\.blocks|text_encoder(?P<m2>_m)?\.encoder\.layer"
               r"|text_decoder\.bert\.encoder\.layer)\.(?P<i>\d+)\.adapter\.(?P<x>.+)$"),
)
_TIED = {  # BLIP's LM head output layer is tied to the decoder's word embeddings
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


@cache
def _all_kinds() -> dict[str, dict[str, list[int]]]:
    with gzip.open(KEYS_FILE, "rt") as f:
        return json.load(f)["kinds"]


def official_shapes(kind: str) -> dict[str, tuple[int, ...]]:
    """Every key of the official checkpoint `kind` and its BLIP-base shape, in the order the code saves them."""
    return {k: tuple(v) for k, v in _all_kinds()[kind].items()}


def model_base_shapes() -> dict[str, tuple[int, ...]]:
    """BLIP's pre-trained `model_base.pth` (`blip_pretrain.py`): the ViT at 224 px, the text encoder, the
    captioning decoder, the ITC/ITM heads, the momentum towers, the two feature queues, `queue_ptr`
    and `temp`; no adapters. Built from the official retrieval and VQA key lists."""
    retrieval, vqa = official_shapes("retrieval_temporalFalse"), official_shapes("vqa")

    def blip(key: str) -> bool:
        return not re.search(r"(^|\.)adapters?(_m|_dec)?\.|video_(key|value)_adapter|time_embed|^(idx|ptr)_queue$", key)

    shapes = {k: s for k, s in retrieval.items() if blip(k)}
    shapes.update({k: s for k, s in vqa.items() if k.startswith("text_decoder.") and blip(k)})
    for key in ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed"):
        shapes[key] = (1, 197, 768)
    shapes["queue_ptr"] = (1,)
    return shapes


def shrink(shapes: Mapping[str, tuple[int, ...]], layers: int = 2) -> dict[str, tuple[int, ...]]:
    """BLIP-base shapes -> tiny ones (`TINY_DIMS`), keeping layers 0..layers-1 of every stack."""
    out = {}
    for key, shape in shapes.items():
        if any(int(i) >= layers for i in re.findall(r"(?:^|\.)(\d+)(?=\.|$)", key)):
            continue
        out[key] = tuple(TINY_DIMS.get(d, d) for d in shape)
    return out


def config_for(kind: str, **overrides: Any) -> dict[str, Any]:
    """The released training config of `kind` (the temporal kinds: video, temporal_embed on), with overrides."""
    config = dict(RETRIEVAL_CONFIG if kind.startswith("retrieval") else VQA_CONFIG)
    if kind.endswith(("temporalTrue", "_temporal")):
        config.update(temporal_embed=True, modality="video")
    config.update(overrides)
    return config


def shrink_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A training config for `shrink`'s tiny model: its adapter widths mapped as the shapes are."""
    return {k: TINY_DIMS.get(v, v) if k.endswith("_dim") and isinstance(v, int) else v for k, v in config.items()}


def shared_group(key: str) -> tuple[str, str, str] | None:
    """(tower set, layer, tensor) naming the one shared adapter tensor `key` aliases, or None."""
    for pattern in _SHARED:
        m = pattern.match(key)
        if m:
            momentum = "_m" if (m.group("m") or m.group("m2")) else ""
            return momentum, m.group("i"), m.group("x")
    return None


def random_state(shapes: Mapping[str, tuple[int, ...]], seed: int, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Seeded random tensors of these shapes; aliases of one shared tensor (and BLIP's tied LM head) equal.
    LayerNorm weights and the K/V scales are around 1; integer buffers are zeros."""
    gen = torch.Generator().manual_seed(seed)
    groups: dict[tuple[str, str, str], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        if re.search(r"^(idx_queue|ptr_queue|queue_ptr)$|position_ids$", key):
            out[key] = torch.zeros(shape, dtype=torch.long)
            continue
        group = shared_group(key)
        if group is not None and group in groups:
            out[key] = groups[group].clone()
            continue
        base = 1.0 if (len(shape) == 1 and key.endswith((".weight", ".scale"))) else 0.0
        out[key] = base + std * torch.randn(shape, generator=gen)
        if group is not None:
            groups[group] = out[key]
    for alias, target in _TIED.items():
        if alias in out and target in out:
            out[alias] = out[target].clone()
    return out


def meta_state(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Shapes only (no memory): for checking a full BLIP-base checkpoint's keys and shapes."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def save_checkpoint(path: Path | str, model_state: Mapping[str, torch.Tensor],
                    config: Mapping[str, Any] | None = None) -> None:
    """As `train_retrieval.py` / `train_vqa.py` save: model, optimizer, config, epoch (config omitted if None)."""
    obj: dict[str, Any] = {"model": dict(model_state), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                           "epoch": 3}
    if config is not None:
        obj["config"] = dict(config)
    torch.save(obj, path)
