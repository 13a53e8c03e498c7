"""`uniadapter adapters convert`: a UniAdapter training checkpoint -> one backbone folder + one adapter set.

A `checkpoint_XX.pth` holds `model` (the full state dict: the frozen backbone, the momentum towers,
the queues, each shared adapter tensor under several aliases, since `state_dict` does not deduplicate
shared modules) and `config` (the training YAML as a dict). Per layer i and adapter tensor X, the
aliases are

    adapters.i.X   visual_encoder.adapters.i.X   visual_encoder.blocks.i.adapter.X
    text_encoder.encoder.layer.i.adapter.X       text_decoder.bert.encoder.layer.i.adapter.X (VQA)

They must all be equal (checked) and become `adapters.i.X` in the set. Other renames:

    {text_encoder,text_decoder.bert}.encoder.video_{key,value}_adapter.*
                                      -> {text_encoder,text_decoder}_kv.{key,value}_adapter.*
    text_encoder.encoder.time_embed   -> temporal_embedding
    vision_proj.*, text_proj.*, itm_head.* (retrieval) -> the set's own heads

Everything else is the backbone (see `model.convert`). Dropped on purpose: `UNIADAPTER_DROPS` (each
with its reason), plus the up-projections of a branch the checkpoint's config turns off (the
original always builds all three, but never runs the disabled one). Any other key is an error.

The branch flags, K/V rank, temporal embedding and the options that have no weights (frame-aware
attention, video modality) come from the checkpoint's `config` when it has one, checked against the
tensors; without a config they are read off the tensor names (frame-aware attention then stays off).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import BlipConfig

from uniadapter_serve.adapters.format import BackboneInfo, load_adapter_set, save_adapter_set
from uniadapter_serve.adapters.golden import GOLDEN_FILE, Prober, write_record
from uniadapter_serve.errors import CheckpointError
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.convert import (
    BLIP_DROPS,
    DropRule,
    convert_blip_state,
    count_reasons,
    drop_reason,
    infer_config,
    load_checkpoint,
    rename_blip_key,
    sha256_file,
    write_backbone,
)
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.tokenizer import default_answer_list, load_tokenizer
from uniadapter_serve.model.uniadapter import HEAD_NAMES, AdapterSetModule, BackboneDims, UniAdapterConfig

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
TEMPORAL_KEY = "text_encoder.encoder.time_embed"
UNIADAPTER_DROPS: tuple[DropRule, ...] = (
    *BLIP_DROPS,
    DropRule(r"^adapters_dec\.", "adapters_dec: a copy of the adapters the VQA code builds and never runs"),
    DropRule(r"^text_decoder\.bert\.encoder\.time_embed$",
             "the answer decoder's temporal embedding: the original adds it to the question states cut into 8 "
             "chunks (question tokens, not frames); this model applies the temporal embedding to frame tokens only"),
)
"""Original keys a conversion leaves out, and why (the BLIP ones included)."""
BRANCH_TENSORS = {
    "visual": ("visual_up_proj",),
    "cross_modal": ("multi_up_proj", "adapter_layer_norm_cross_modal"),
    "textual": ("up_proj",),  # also used by the cross-modal branch
}
ORIGINAL_OPTIONS = ("adapter", "adapter_visual", "adapter_textual", "adapter_multimodal", "adapter_dim",
                    "adapter_visual_dim", "video_key_adapter", "video_key_adapter_dim", "temporal_embed",
                    "frame_aware_attention", "modality", "image_size", "dataset")
"""The training-config options a conversion reads or records."""


@dataclass
class ConversionPlan:
    """How one UniAdapter checkpoint converts, decided before anything is written (works on meta tensors)."""

    task: str
    adapter_config: UniAdapterConfig
    backbone_config: BlipConfig
    adapter: dict[str, torch.Tensor]
    """the set's tensors, in our names"""
    backbone: dict[str, torch.Tensor]
    """the backbone's tensors, in transformers' names"""
    mapped: dict[str, tuple[str, str]] = field(default_factory=dict)
    """original key -> ("set" or "backbone", our key)"""
    dropped: dict[str, str] = field(default_factory=dict)
    """original key -> why it is left out"""
    config_from: str = "tensor names"
    """where the adapter options came from: "checkpoint config" or "tensor names" """
    original_options: dict[str, Any] = field(default_factory=dict)


def _adapter_name(key: str) -> str | None:
    for pattern in ADAPTER_ALIASES:
        m = re.match(pattern, key)
        if m:
            return f"adapters.{m.group(1)}.{m.group(2)}"
    for pattern, target in KV_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, target, key)
    if key == TEMPORAL_KEY:
        return "temporal_embedding"
    return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    return True if (a.is_meta or b.is_meta) else torch.equal(a, b)


def split_checkpoint(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                                  dict[str, str], dict[str, str]]:
    """-> (set tensors in our names, the rest in original names, {original: our set key}, {dropped: reason}).

    Checks that the aliases of one shared tensor are equal."""
    adapter: dict[str, torch.Tensor] = {}
    seen_from: dict[str, str] = {}
    rest: dict[str, torch.Tensor] = {}
    mapped: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for key, tensor in state.items():
        reason = drop_reason(key, UNIADAPTER_DROPS)
        if reason is not None:
            dropped[key] = reason
            continue
        target = _adapter_name(key)
        if target is None:
            rest[key] = tensor
            continue
        mapped[key] = target
        if target in adapter:
            if not _same(adapter[target], tensor):
                raise CheckpointError(f"aliases of one shared adapter tensor disagree: {seen_from[target]} != {key}")
            continue
        adapter[target], seen_from[target] = tensor, key
    return adapter, rest, mapped, dropped


def original_options(config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The options of a checkpoint's training config this conversion reads (None: no config saved)."""
    if config is None:
        return None
    return {k: config[k] for k in ORIGINAL_OPTIONS if k in config and isinstance(config[k], (bool, int, float, str))}


def infer_task(has_decoder: bool, options: Mapping[str, Any] | None) -> str:
    if not has_decoder:
        return "retrieval"
    return "videoqa" if options is not None and options.get("modality") == "video" else "vqa"


def infer_adapter_config(tensors: Mapping[str, torch.Tensor], task: str,
                         options: Mapping[str, Any] | None = None) -> UniAdapterConfig:
    """The set's config: from the checkpoint's training options where it saved them (checked against the
    tensors), else from the tensor names."""
    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("adapters.")})
    if not layers:
        raise CheckpointError("the checkpoint has no UniAdapter tensors (adapters.i.*): not a UniAdapter checkpoint")
    first = f"adapters.{layers[0]}."
    bottleneck = int(tensors[first + "down_proj.weight"].shape[0])
    kv = tensors.get("text_encoder_kv.key_adapter.down_proj.weight")
    kv_rank = int(kv.shape[0]) if kv is not None else 0
    temporal = tensors.get("temporal_embedding")
    heads = [h for h in HEAD_NAMES if f"{h}.weight" in tensors]
    opts = dict(options or {})

    def flag(name: str, from_keys: bool) -> bool:
        return bool(opts[name]) if name in opts else from_keys

    def disagree(name: str, says: Any, found: Any) -> CheckpointError:
        return CheckpointError(f"the checkpoint's config says {name}: {says!r} but its tensors give {found!r}")

    if not flag("adapter", True):
        raise CheckpointError("the checkpoint's config says adapter: False: it trained no UniAdapter to convert")
    dim_option = "adapter_dim" if task == "retrieval" else "adapter_visual_dim"  # what each original model reads
    if isinstance(opts.get(dim_option), int) and opts[dim_option] != bottleneck:
        raise disagree(dim_option, opts[dim_option], bottleneck)
    if "video_key_adapter" in opts:
        if bool(opts["video_key_adapter"]) != bool(kv_rank):
            raise disagree("video_key_adapter", opts["video_key_adapter"], f"K/V rank {kv_rank}")
        if kv_rank and isinstance(opts.get("video_key_adapter_dim"), int) and opts["video_key_adapter_dim"] != kv_rank:
            raise disagree("video_key_adapter_dim", opts["video_key_adapter_dim"], kv_rank)
    if "temporal_embed" in opts and bool(opts["temporal_embed"]) != (temporal is not None):
        raise disagree("temporal_embed", opts["temporal_embed"], f"{TEMPORAL_KEY} present: {temporal is not None}")
    return UniAdapterConfig(
        task=task, bottleneck=bottleneck, layers=layers,
        visual=flag("adapter_visual", first + "visual_up_proj.weight" in tensors),
        textual=flag("adapter_textual", first + "up_proj.weight" in tensors),
        cross_modal=flag("adapter_multimodal", first + "multi_up_proj.weight" in tensors),
        decoder=task != "retrieval", kv_rank=kv_rank, heads=heads,
        temporal_embedding=temporal is not None, num_frames=int(temporal.shape[1]) if temporal is not None else 8,
        frame_aware_attention=flag("frame_aware_attention", False),
    )


def _unused_branch(key: str, config: UniAdapterConfig) -> str | None:
    """Why set tensor `key` is unused under `config` (a branch the training config turned off), or None."""
    m = re.match(r"^adapters\.\d+\.([a-z_]+)\.", key)
    if m is None:
        return None
    off = {"visual": not config.visual, "cross_modal": not config.cross_modal,
           "textual": not (config.textual or config.cross_modal)}
    for branch, names in BRANCH_TENSORS.items():
        if off[branch] and m.group(1) in names:
            return f"{branch} branch off in the checkpoint's config: the original builds it but never runs it"
    return None


def backbone_dims(config: BlipConfig) -> BackboneDims:
    with torch.device("meta"):
        return BlipBackbone(config, ["vision_model", "text_encoder"]).dims


def plan_conversion(state: Mapping[str, torch.Tensor], checkpoint_config: Mapping[str, Any] | None = None, *,
                    task: str | None = None, vision_heads: int | None = None,
                    text_heads: int | None = None) -> ConversionPlan:
    """Decide every key's fate and both configs; raises CheckpointError on anything that does not fit."""
    adapter, rest, set_keys, dropped = split_checkpoint(state)
    options = original_options(checkpoint_config)
    task = task or infer_task(any(k.startswith("text_decoder.") for k in rest), options)
    mapped: dict[str, tuple[str, str]] = {k: ("set", v) for k, v in set_keys.items()}
    proj = rest.get("vision_proj.weight")
    embed_dim = int(proj.shape[0]) if proj is not None else None
    if task == "retrieval":
        for head in HEAD_NAMES:  # the trained heads belong to the set
            for suffix in ("weight", "bias"):
                key = f"{head}.{suffix}"
                if key in rest:
                    adapter[key] = rest.pop(key)
                    mapped[key] = ("set", key)
    backbone, blip_dropped = convert_blip_state(rest)
    dropped.update(blip_dropped)
    for key in rest:
        if key not in blip_dropped:
            mapped[key] = ("backbone", rename_blip_key(key) or key)
    backbone_config = infer_config(backbone, vision_heads=vision_heads, text_heads=text_heads, embed_dim=embed_dim)
    adapter_config = infer_adapter_config(adapter, task, options)
    unused = {k: r for k in adapter if (r := _unused_branch(k, adapter_config)) is not None}
    for key, reason in unused.items():
        del adapter[key]
        for original in [o for o, (where, ours) in mapped.items() if where == "set" and ours == key]:
            del mapped[original]
            dropped[original] = reason
    with torch.device("meta"):
        expected = AdapterSetModule(adapter_config, backbone_dims(backbone_config), init=False).state_dict()
    missing = sorted(set(expected) - set(adapter))
    unexpected = sorted(set(adapter) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(adapter) if expected[k].shape != adapter[k].shape)
    if missing or unexpected or misshaped:
        raise CheckpointError(f"adapter tensors do not fit the {'checkpoint' if options else 'inferred'} config: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}, misshaped {misshaped[:5]}")
    return ConversionPlan(task, adapter_config, backbone_config, adapter, backbone, mapped, dropped,
                          "checkpoint config" if options is not None else "tensor names", options or {})


def convert_uniadapter_checkpoint(source: str | Path, backbone_dir: str | Path, set_dir: str | Path, *,
                                  name: str, task: str | None = None, vision_heads: int | None = None,
                                  text_heads: int | None = None, tokenizer: str | Path | None = None) -> dict[str, Any]:
    """Write the frozen backbone (transformers layout, with `tokenizer`'s files: see `write_backbone`) and the
    adapter set, each with its golden record (`golden.json`: the bare backbone's and the set's, computed on the
    CPU in float32 from the folders as a server loads them); returns a report."""
    source = Path(source)
    checkpoint = load_checkpoint(source)
    plan = plan_conversion(checkpoint.state, checkpoint.config, task=task, vision_heads=vision_heads,
                           text_heads=text_heads)
    digest = sha256_file(source)
    dropped = count_reasons(plan.dropped)
    backbone_report = write_backbone(backbone_dir, plan.backbone_config, plan.backbone,
                                     {"source": str(source), "source_sha256": digest}, tokenizer=tokenizer)
    backbone = load_backbone(backbone_dir)
    module = AdapterSetModule(plan.adapter_config, backbone.dims)
    module.load_state_dict({k: v.to(torch.float32) for k, v in plan.adapter.items()}, strict=True)
    version = save_adapter_set(module, set_dir, name=name, backbone=BackboneInfo.of(backbone),
                               extra={"source": str(source), "source_sha256": digest, "converted_from": "UniAdapter",
                                      "config_from": plan.config_from, "original_options": plan.original_options})
    loaded = load_adapter_set(set_dir, backbone)  # round trip: the set loads on the backbone written beside it
    prober = Prober(backbone, load_tokenizer(backbone_dir, backbone.config), default_answer_list(backbone_dir))
    write_record(backbone_dir, prober.record())
    write_record(set_dir, prober.record(loaded.module, ref=loaded.meta.ref, answer_list=loaded.meta.answer_list))
    return {"backbone": {**backbone_report, "golden": str(Path(backbone_dir) / GOLDEN_FILE)}, "dropped": dropped,
            "adapter_set": {"folder": str(set_dir), "name": name, "version": version, "task": plan.task,
                            "config": plan.adapter_config.to_dict(), "config_from": plan.config_from,
                            "tunable_parameters": module.num_parameters(),
                            "golden": str(Path(set_dir) / GOLDEN_FILE)}}

