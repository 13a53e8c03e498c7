"""`uniadapter adapters convert`: a UniAdapter training checkpoint -> one backbone folder + one adapter set.

A `checkpoint_XX.pth` holds the full state dict: the frozen backbone, the momentum towers, the
queues, and each shared adapter tensor under several aliases (`state_dict` does not deduplicate
shared modules). Per layer i and adapter tensor X, the aliases are

    adapters.i.X   visual_encoder.adapters.i.X   visual_encoder.blocks.i.adapter.X
    text_encoder.encoder.layer.i.adapter.X       text_decoder.bert.encoder.layer.i.adapter.X (VQA)

They must all be equal (checked) and become `adapters.i.X` in the set. `adapters_dec.*` (an unused
copy in the VQA code) and every `*_m.*` momentum key are dropped. K/V deltas map
`{text_encoder,text_decoder.bert}.encoder.video_{key,value}_adapter.*` to
`{text_encoder,text_decoder}_kv.{key,value}_adapter.*`; `time_embed` becomes `temporal_embedding`.
Retrieval checkpoints keep their trained `vision_proj`, `text_proj`, `itm_head` in the set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from uniadapter_serve.adapters.format import BackboneInfo, load_adapter_set, save_adapter_set
from uniadapter_serve.errors import CheckpointError
from uniadapter_serve.model.convert import convert_blip_state, infer_config, load_pth, sha256_file, write_backbone
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.uniadapter import HEAD_NAMES, AdapterSetModule, UniAdapterConfig

ADAPTER_ALIASES = (
    r"^adapters\.(\d+)\.(.+)$",
    r"^visual_encoder\.adapters\.(\d+)\.(.+)$",
    r"^visual_encoder\.blocks\.(\d+)\.adapter\.(.+)$",
    r"^text_encoder\.encoder\.layer\.(\d+)\.adapter\.(.+)$",
    r"^text_decoder\.bert\.encoder\.layer\.(\d+)\.adapter\.(.+)$",
)
KV_RULES = (
    (r"^text_encoder\.encoder\.video_(key|value)_adapter\.(.+)$", r"text_encoder_kv.\1_adapter.\2"),
    (r"^text_decoder\.bert\.encoder\.video_(key|value)_adapter\.(.+)$", r"text_decoder_kv.\1_adapter.\2"),
)


def split_checkpoint(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """-> (adapter-set tensors in our names, the rest in original BLIP names). Checks alias equality."""
    adapter: dict[str, torch.Tensor] = {}
    seen_from: dict[str, str] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.split(".", 1)[0].endswith("_m") or key.startswith("adapters_dec."):
            continue
        target = _adapter_name(key)
        if target is None:
            rest[key] = tensor
            continue
        if target in adapter:
            if adapter[target].shape != tensor.shape or not torch.equal(adapter[target], tensor):
                raise CheckpointError(f"aliases of one shared adapter tensor disagree: {seen_from[target]} != {key}")
            continue
        adapter[target], seen_from[target] = tensor, key
    return adapter, rest


def _adapter_name(key: str) -> str | None:
    for pattern in ADAPTER_ALIASES:
        m = re.match(pattern, key)
        if m:
            return f"adapters.{m.group(1)}.{m.group(2)}"
    for pattern, target in KV_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    if key == "time_embed":
        return "temporal_embedding"
    return None


def infer_adapter_config(tensors: Mapping[str, torch.Tensor], task: str) -> UniAdapterConfig:
    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("adapters.")})
    if not layers:
        raise CheckpointError("the checkpoint has no UniAdapter tensors (adapters.i.*): not a UniAdapter checkpoint")
    first = f"adapters.{layers[0]}."
    kv = tensors.get("text_encoder_kv.key_adapter.down_proj.weight")
    temporal = tensors.get("temporal_embedding")
    heads = [h for h in HEAD_NAMES if f"{h}.weight" in tensors]
    return UniAdapterConfig(
        task=task, bottleneck=int(tensors[first + "down_proj.weight"].shape[0]), layers=layers,
        visual=first + "visual_up_proj.weight" in tensors, textual=first + "up_proj.weight" in tensors,
        cross_modal=first + "multi_up_proj.weight" in tensors, decoder="text_decoder_kv.key_adapter.scale" in tensors
        or task != "retrieval", kv_rank=int(kv.shape[0]) if kv is not None else 0, heads=heads,
        temporal_embedding=temporal is not None, num_frames=int(temporal.shape[1]) if temporal is not None else 8,
    )


def convert_uniadapter_checkpoint(source: str | Path, backbone_dir: str | Path, set_dir: str | Path, *,
                                  name: str, task: str | None = None, vision_heads: int | None = None,
                                  text_heads: int | None = None) -> dict[str, Any]:
    """Write the frozen backbone (transformers layout) and the adapter set; returns a report."""
    source = Path(source)
    state = load_pth(source)
    adapter, rest = split_checkpoint(state)
    has_decoder = any(k.startswith("text_decoder.") for k in rest)
    task = task or ("vqa" if has_decoder else "retrieval")
    proj = rest.get("vision_proj.weight")
    embed_dim = int(proj.shape[0]) if proj is not None else None
    if task == "retrieval":
        for head in HEAD_NAMES:  # the trained heads belong to the set
            for suffix in ("weight", "bias"):
                if f"{head}.{suffix}" in rest:
                    adapter[f"{head}.{suffix}"] = rest.pop(f"{head}.{suffix}")
    backbone_state = convert_blip_state(rest)
    config = infer_config(backbone_state, vision_heads=vision_heads, text_heads=text_heads, embed_dim=embed_dim)
    digest = sha256_file(source)
    backbone_report = write_backbone(backbone_dir, config, backbone_state,
                                     {"source": str(source), "source_sha256": digest})
    backbone = load_backbone(backbone_dir)
    adapter_config = infer_adapter_config(adapter, task)
    with torch.device("meta"):
        expected = AdapterSetModule(adapter_config, backbone.dims).state_dict()
    missing = sorted(set(expected) - set(adapter))
    unexpected = sorted(set(adapter) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"adapter tensors do not fit the inferred config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    module = AdapterSetModule(adapter_config, backbone.dims)
    module.load_state_dict({k: v.to(torch.float32) for k, v in adapter.items()}, strict=True)
    version = save_adapter_set(module, set_dir, name=name, backbone=BackboneInfo.of(backbone),
                               extra={"source": str(source), "source_sha256": digest, "converted_from": "UniAdapter"})
    load_adapter_set(set_dir, backbone)  # round trip: the set loads on the backbone written beside it
    return {"backbone": backbone_report, "adapter_set": {"folder": str(set_dir), "name": name, "version": version,
                                                         "task": task, "config": adapter_config.to_dict(),
                                                         "tunable_parameters": module.num_parameters()}}
