"""Build checkpoints the way the original BLIP / UniAdapter code saves them, from our modules."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

TO_ORIGINAL = (
    (r"^vision_model\.embeddings\.class_embedding$", "visual_encoder.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "visual_encoder.pos_embed"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual_encoder.patch_embed.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual_encoder.blocks.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual_encoder.blocks.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"visual_encoder.blocks.\1.attn.qkv."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection\.", r"visual_encoder.blocks.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"visual_encoder.blocks.\1.mlp."),
    (r"^vision_model\.post_layernorm\.", "visual_encoder.norm."),
)


def to_original(key: str) -> str:
    for pattern, target in TO_ORIGINAL:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    return key


def blip_state(backbone_state: Mapping[str, torch.Tensor], *, momentum: bool = True) -> dict[str, torch.Tensor]:
    """Our backbone state -> original BLIP names, plus what the original saves and we drop."""
    out = {to_original(k): v.clone() for k, v in backbone_state.items()}
    if "text_decoder.cls.predictions.bias" in out:  # BLIP's tied LM head is saved under both names
        out["text_decoder.cls.predictions.decoder.weight"] = out["text_decoder.bert.embeddings.word_embeddings.weight"]
        out["text_decoder.cls.predictions.decoder.bias"] = out["text_decoder.cls.predictions.bias"]
    width = out["text_encoder.embeddings.position_embeddings.weight"].shape[0]
    out["text_encoder.embeddings.position_ids"] = torch.arange(width)[None]
    if momentum:
        for k in list(out):
            head, _, rest = k.partition(".")
            if head in ("visual_encoder", "text_encoder", "vision_proj", "text_proj"):
                out[f"{head}_m.{rest}"] = out[k].clone()
        out["temp"] = torch.tensor(0.07)
        out["image_queue"] = torch.randn(8, 16)
        out["text_queue"] = torch.randn(8, 16)
        out["idx_queue"] = torch.zeros(1, 16, dtype=torch.long)
        out["ptr_queue"] = torch.zeros(1, dtype=torch.long)
    return out


def uniadapter_state(backbone_state: Mapping[str, torch.Tensor], adapter_state: Mapping[str, torch.Tensor],
                     *, vqa: bool) -> dict[str, torch.Tensor]:
    """A UniAdapter checkpoint's `model`: backbone + every alias of the shared adapters + K/V + momentum."""
    out = blip_state(backbone_state)
    for key, tensor in adapter_state.items():
        m = re.match(r"^adapters\.(\d+)\.(.+)$", key)
        if m:
            i, x = m.groups()
            aliases = [f"adapters.{i}.{x}", f"visual_encoder.adapters.{i}.{x}",
                       f"visual_encoder.blocks.{i}.adapter.{x}", f"text_encoder.encoder.layer.{i}.adapter.{x}",
                       f"adapters_m.{i}.{x}", f"visual_encoder_m.blocks.{i}.adapter.{x}"]
            if vqa:
                aliases += [f"text_decoder.bert.encoder.layer.{i}.adapter.{x}", f"adapters_dec.{i}.{x}"]
            for alias in aliases:
                out[alias] = tensor.clone()
            continue
        m = re.match(r"^text_(encoder|decoder)_kv\.(key|value)_adapter\.(.+)$", key)
        if m:
            tower, kv, x = m.groups()
            prefix = "text_encoder.encoder" if tower == "encoder" else "text_decoder.bert.encoder"
            out[f"{prefix}.video_{kv}_adapter.{x}"] = tensor.clone()
            continue
        if key == "temporal_embedding":
            out["time_embed"] = tensor.clone()
            continue
        out[key] = tensor.clone()  # trained heads overwrite the backbone's
    return out


def save_checkpoint(path, model_state: Mapping[str, torch.Tensor]) -> None:
    torch.save({"model": dict(model_state), "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                "config": {"vit": "base", "image_size": 384, "adapter_dim": 512}, "epoch": 3}, path)
