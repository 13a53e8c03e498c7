"""Offline converters for original BLIP checkpoints and transformers-format BLIP folders.

Original BLIP `.pth` files (`model_base.pth`, `model_base_retrieval_*.pth`,
`model_base_vqa_capfilt_large.pth`) are read with `torch.load(weights_only=True)` and memory-mapped,
renamed to transformers' BLIP layout and written as a backbone folder (`config.json` +
`model.safetensors`). Key map (applied to `visual_encoder.*`):

    visual_encoder.cls_token              -> vision_model.embeddings.class_embedding
    visual_encoder.pos_embed              -> vision_model.embeddings.position_embedding
    visual_encoder.patch_embed.proj.*     -> vision_model.embeddings.patch_embedding.*
    visual_encoder.blocks.i.norm1/norm2.* -> vision_model.encoder.layers.i.layer_norm1/layer_norm2.*
    visual_encoder.blocks.i.attn.qkv.*    -> vision_model.encoder.layers.i.self_attn.qkv.*
    visual_encoder.blocks.i.attn.proj.*   -> vision_model.encoder.layers.i.self_attn.projection.*
    visual_encoder.blocks.i.mlp.fc1/fc2.* -> vision_model.encoder.layers.i.mlp.fc1/fc2.*
    visual_encoder.norm.*                 -> vision_model.post_layernorm.*
    text_encoder.*, text_decoder.*, vision_proj.*, text_proj.*, itm_head.*: unchanged

Dropped on purpose (`BLIP_DROPS`, each with its reason; any other key is an error naming it): the
ITC temperature `temp`; the ITC queues `image_queue`, `text_queue`, `idx_queue` and their write
pointer (`ptr_queue` in retrieval models, `queue_ptr` in pre-training's `model_base.pth`); the
momentum towers (`*_m.*`); `position_ids` buffers; BERT pooler weights.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import BlipConfig

from uniadapter_serve.errors import CheckpointError
from uniadapter_serve.model.backbone import COMPONENTS, text_config, vision_config
from uniadapter_serve.model.loading import backbone_from_state_dict, component_of, load_config, read_safetensors
from uniadapter_serve.model.preprocess import write_preprocessor_config
from uniadapter_serve.model.tokenizer import TOKENIZER_FILES, BlipTokenizer, load_tokenizer


@dataclass(frozen=True)
class DropRule:
    """Keys matching `pattern` (a regex, searched) are left out of the conversion, for `reason`."""

    pattern: str
    reason: str

    def matches(self, key: str) -> bool:
        return re.search(self.pattern, key) is not None


BLIP_DROPS: tuple[DropRule, ...] = (
    DropRule(r"^temp$", "ITC temperature (training only)"),
    DropRule(r"^(image|text)_queue$", "ITC momentum feature queue (training only)"),
    DropRule(r"^idx_queue$", "ITC image-id queue for id-aware positives (retrieval training only)"),
    DropRule(r"^(ptr_queue|queue_ptr)$", "ITC queue write pointer (ptr_queue in retrieval, queue_ptr in pre-training)"),
    DropRule(r"^[^.]+_m\.", "momentum tower (*_m): the EMA copy used for distillation in training"),
    DropRule(r"(^|\.)position_ids$", "position-id buffer, rebuilt from the config"),
    DropRule(r"\.pooler\.", "BERT pooler, unused by BLIP's tasks"),
)
VISION_RULES: tuple[tuple[str, str], ...] = (
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.", r"vision_model.encoder.layers.\1.self_attn.qkv."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^visual_encoder\.norm\.", "vision_model.post_layernorm."),
)
UNCHANGED_PREFIXES = ("text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Checkpoint:
    """What a `.pth` training checkpoint holds that a conversion reads."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    """The training config saved beside the weights (UniAdapter and BLIP save `config`), if any."""


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The state dict (and config, if saved) of a `.pth` checkpoint: weights only (no pickle code), memory-mapped."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} needs pickle code to load (classes or functions, not just tensors); refusing to run it. "
            f"Re-save its state dict with tensors and plain containers only. ({str(e).splitlines()[0]})"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or not a PyTorch checkpoint: {e}") from e
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (looked at 'model', 'state_dict', the top level)")
    config = obj.get("config") if state is not obj else None
    if config is not None and not (isinstance(config, dict) and all(isinstance(k, str) for k in config)):
        raise CheckpointError(f"{path}: its 'config' entry is a {type(config).__name__}, not a dict of named options")
    return Checkpoint(state, config)


def load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a `.pth` checkpoint (see `load_checkpoint`)."""
    return load_checkpoint(path).state


def drop_reason(key: str, rules: tuple[DropRule, ...] = BLIP_DROPS) -> str | None:
    """Why `key` is left out of a conversion, or None if it is not."""
    return next((rule.reason for rule in rules if rule.matches(key)), None)


def rename_blip_key(key: str) -> str | None:
    """Original BLIP name -> transformers name; None for keys that are dropped or match no rule."""
    if drop_reason(key) is not None:
        return None
    for pattern, target in VISION_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    if key.startswith(UNCHANGED_PREFIXES):
        return key
    return None


def convert_blip_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename every key -> (transformers-named state, {dropped key: reason}). A key that is neither
    renamed nor in `BLIP_DROPS` is an error listing it."""
    out: dict[str, torch.Tensor] = {}
    dropped: dict[str, str] = {}
    unknown = []
    for key, tensor in state.items():
        reason = drop_reason(key)
        if reason is not None:
            dropped[key] = reason
            continue
        new = rename_blip_key(key)
        if new is None:
            unknown.append(key)
            continue
        out[new] = tensor
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys match no BLIP rule: {sorted(unknown)[:10]}")
    return out, dropped


def count_reasons(dropped: Mapping[str, str]) -> dict[str, int]:
    """{dropped key: reason} -> {reason: how many keys} (for conversion reports)."""
    return dict(Counter(dropped.values()))


def infer_config(state: Mapping[str, torch.Tensor], *, vision_heads: int | None = None,
                 text_heads: int | None = None, vision_eps: float = 1e-6, embed_dim: int | None = None) -> BlipConfig:
    """A BlipConfig from the shapes of a (transformers-named) state dict. Heads are not visible in shapes:
    the default is hidden / 64 (ViT-B and BERT-base use 64-wide heads). BLIP's ViT uses LayerNorm eps 1e-6."""
    def layers(prefix: str) -> int:
        found = [int(m.group(1)) for k in state if (m := re.match(rf"^{re.escape(prefix)}(\d+)\.", k))]
        return max(found) + 1 if found else 0

    try:
        pos = state["vision_model.embeddings.position_embedding"]
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        words = state["text_encoder.embeddings.word_embeddings.weight"]
        v_hidden, p = int(patch.shape[0]), int(patch.shape[-1])
        t_hidden = int(words.shape[1])
        grid = round((pos.shape[1] - 1) ** 0.5)
        vision = {
            "hidden_size": v_hidden, "patch_size": p, "image_size": grid * p,
            "intermediate_size": int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
            "num_hidden_layers": layers("vision_model.encoder.layers."),
            "num_attention_heads": vision_heads or max(1, v_hidden // 64), "layer_norm_eps": vision_eps,
        }
        text = {
            "vocab_size": int(words.shape[0]), "hidden_size": t_hidden, "encoder_hidden_size": v_hidden,
            "intermediate_size": int(state["text_encoder.encoder.layer.0.intermediate.dense.weight"].shape[0]),
            "num_hidden_layers": layers("text_encoder.encoder.layer."),
            "num_attention_heads": text_heads or max(1, t_hidden // 64),
            "max_position_embeddings": int(state["text_encoder.embeddings.position_embeddings.weight"].shape[0]),
            "bos_token_id": 30522 if words.shape[0] == 30524 else 2, "pad_token_id": 0,
            "sep_token_id": 102 if words.shape[0] == 30524 else 3,
        }
    except KeyError as e:
        raise CheckpointError(f"cannot infer the BLIP config: key {e} is missing") from e
    embed = state.get("vision_proj.weight")
    if embed_dim is None:
        embed_dim = int(embed.shape[0]) if embed is not None else 256
    return BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=embed_dim)


def backbone_tokenizer(source: str | Path | None, config: BlipConfig) -> BlipTokenizer:
    """The tokenizer in folder `source` (checked against the backbone's vocabulary), or the demo vocabulary."""
    if source is None:
        return BlipTokenizer.demo(text_config(config).vocab_size)
    if not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{source} holds no tokenizer (none of {list(TOKENIZER_FILES)})")
    return load_tokenizer(source, config)


def write_backbone(folder: str | Path, config: BlipConfig, state: Mapping[str, torch.Tensor],
                   extra: dict[str, Any] | None = None, *, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Validate `state` against `config` (by building the backbone on it), then write the folder: weights,
    `preprocessor_config.json` and the tokenizer ([DEC]/[ENC] registered), so transformers'
    `BlipProcessor.from_pretrained(folder)` works on it. `tokenizer`: a folder holding BLIP's tokenizer; without
    one, the tokenizer the service would load for a folder with none (the demo vocabulary)."""
    model = backbone_from_state_dict(config, state)  # raises CheckpointError naming missing/extra/misshaped keys
    tok = backbone_tokenizer(tokenizer, config)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save(folder)
    write_preprocessor_config(folder, int(vision_config(config).image_size))  # type: ignore[arg-type]
    report = {"folder": str(folder), "components": list(model.components), "fingerprints": model.fingerprints,
              "parameters": model.component_parameters(),
              "tokenizer": str(tokenizer) if tokenizer is not None else "demo vocabulary (no tokenizer given)",
              **(extra or {})}
    (folder / "conversion.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def convert_blip_pth(source: str | Path, target: str | Path, *, vision_heads: int | None = None,
                     text_heads: int | None = None, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Original BLIP `.pth` -> backbone folder (`tokenizer`: a folder with BLIP's tokenizer to copy in)."""
    state, dropped = convert_blip_state(load_pth(source))
    config = infer_config(state, vision_heads=vision_heads, text_heads=text_heads)
    return write_backbone(target, config, state, {"source": str(source), "source_sha256": sha256_file(Path(source)),
                                                  "dropped": count_reasons(dropped)}, tokenizer=tokenizer)


def merge_backbones(sources: list[str | Path], target: str | Path) -> dict[str, Any]:
    """Transformers BLIP folders (e.g. an ITM and a VQA checkpoint) -> one backbone folder.

    The first folder wins for components several have (vision_model, text_encoder); the others add
    what the first lacks (the VQA answer decoder, the retrieval heads). The tokenizer is the first one found
    among the folders.
    """
    if not sources:
        raise CheckpointError("give at least one folder")
    config: BlipConfig | None = None
    merged: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for src in sources:
        folder = Path(src)
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder} has no config.json")
        state = read_safetensors(folder)
        if config is None:
            config = load_config(folder / "config.json")
        present = {component_of(k) for k in state} - {None}
        for comp in COMPONENTS:
            if comp in present and comp not in origin:
                origin[comp] = str(folder)
                merged.update({k: v for k, v in state.items() if component_of(k) == comp})
        for alias in ("text_decoder.cls.predictions.decoder.weight", "text_decoder.cls.predictions.decoder.bias"):
            merged.pop(alias, None)
    assert config is not None
    tokenizer = next((Path(src) for src in sources if any((Path(src) / f).is_file() for f in TOKENIZER_FILES)), None)
    report = write_backbone(target, config, merged, {"sources": origin}, tokenizer=tokenizer)
    shared = [c for c in ("vision_model", "text_encoder") if c in origin]
    report["note"] = f"{', '.join(shared)} taken from {sources[0]}"
    return report
