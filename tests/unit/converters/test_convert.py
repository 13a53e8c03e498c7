"""Converters on checkpoints saved as the original code saves them (tiny dims, original key names)."""

from __future__ import annotations

import pytest
import torch
from support.original import blip_state, save_checkpoint, uniadapter_state

from uniadapter_serve.adapters.convert import convert_uniadapter_checkpoint
from uniadapter_serve.adapters.format import load_adapter_set
from uniadapter_serve.errors import CheckpointError
from uniadapter_serve.model.convert import convert_blip_pth, merge_backbones
from uniadapter_serve.model.loading import backbone_from_state_dict, load_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.model.vqa import answer_log_likelihood

HEADS = {"vision_heads": 4, "text_heads": 4}


@pytest.fixture
def blip_config(tiny_config):
    """The tiny config with BLIP's own ViT LayerNorm eps (1e-6), which the converters assume."""
    config = tiny_config.__class__.from_dict(tiny_config.to_dict())
    config.vision_config.layer_norm_eps = 1e-6
    return config


@pytest.fixture
def original(backbone, blip_config):
    """The fixture's weights in a backbone with BLIP's eps: what a converted checkpoint must equal."""
    return backbone_from_state_dict(blip_config, backbone.state_dict())


def _without(state, prefix):
    return {k: v for k, v in state.items() if not k.startswith(prefix)}


@torch.no_grad()
def _outputs(backbone, adapter):
    b = random_batch(backbone, 2, seed=5)
    r = Routing.single(adapter, 2)
    image = backbone.encode_image(b.pixel_values, r)
    out = {"image": image, "text": backbone.encode_text(b.input_ids, b.attention_mask, r)}
    if backbone.vision_proj is not None or (adapter is not None and adapter.vision_proj is not None):
        out["itc"] = backbone.image_features(image, r)
        out["text_itc"] = backbone.text_features(b.input_ids, b.attention_mask, r)
        out["itm"] = backbone.itm_logits(b.input_ids, b.attention_mask, image, r)
    if backbone.text_decoder is not None:
        q = backbone.encode_multimodal(b.input_ids, b.attention_mask, image, routing=r)
        out["answer"] = answer_log_likelihood(backbone, q, b.attention_mask, b.answer_ids, b.answer_mask, r)
    return out


def test_blip_pth_round_trip(original, tmp_path):
    save_checkpoint(tmp_path / "model_base.pth", blip_state(original.state_dict()))
    report = convert_blip_pth(tmp_path / "model_base.pth", tmp_path / "out", **HEADS)
    converted = load_backbone(tmp_path / "out")
    assert converted.fingerprints == original.fingerprints  # every tensor at the right name, same values
    assert report["components"] == ["vision_model", "text_encoder", "text_decoder", "heads"]
    assert len(report["source_sha256"]) == 64
    ours, theirs = _outputs(original, None), _outputs(converted, None)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_unknown_and_missing_keys_are_listed(backbone, tmp_path):
    state = blip_state(backbone.state_dict())
    state["visual_encoder.blocks.0.attn.mystery"] = torch.zeros(3)
    save_checkpoint(tmp_path / "a.pth", state)
    with pytest.raises(CheckpointError, match=r"match no BLIP rule.*attn\.mystery"):
        convert_blip_pth(tmp_path / "a.pth", tmp_path / "out", **HEADS)
    state = blip_state(backbone.state_dict())
    del state["visual_encoder.blocks.1.mlp.fc2.bias"]
    save_checkpoint(tmp_path / "b.pth", state)
    with pytest.raises(CheckpointError, match=r"missing keys.*layers\.1\.mlp\.fc2\.bias"):
        convert_blip_pth(tmp_path / "b.pth", tmp_path / "out2", **HEADS)


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_uniadapter_checkpoint_equals_direct_load(original, task, tmp_path):
    backbone = original
    config = UniAdapterConfig.for_task(task, bottleneck=8, kv_rank=4)
    adapter = random_adapter(backbone, config, seed=11)
    # the trained heads of a retrieval checkpoint live in the set; a VQA checkpoint has none
    bb_state = {k: v for k, v in backbone.state_dict().items()
                if not k.startswith(("vision_proj", "text_proj", "itm_head"))}
    if task == "retrieval":
        bb_state = _without(bb_state, "text_decoder.")
    direct = backbone_from_state_dict(backbone.config, bb_state)
    save_checkpoint(tmp_path / "checkpoint_05.pth", uniadapter_state(bb_state, adapter.state_dict(), vqa=task == "vqa"))
    report = convert_uniadapter_checkpoint(tmp_path / "checkpoint_05.pth", tmp_path / "bb", tmp_path / "set",
                                           name="ua", **HEADS)
    assert report["adapter_set"]["task"] == task
    assert report["adapter_set"]["config"]["bottleneck"] == 8 and report["adapter_set"]["config"]["kv_rank"] == 4
    converted = load_backbone(tmp_path / "bb")
    assert converted.fingerprints == direct.fingerprints
    loaded = load_adapter_set(tmp_path / "set", converted)
    for key, tensor in adapter.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], tensor), key
    assert loaded.meta.extra["source_sha256"] == report["backbone"]["source_sha256"]
    ours, theirs = _outputs(direct, adapter), _outputs(converted, loaded.module)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_disagreeing_aliases_are_refused(backbone, tmp_path):
    adapter = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8), seed=12)
    state = uniadapter_state(_without(backbone.state_dict(), "text_decoder."), adapter.state_dict(), vqa=False)
    state["text_encoder.encoder.layer.1.adapter.down_proj.weight"] += 1e-3
    save_checkpoint(tmp_path / "c.pth", state)
    with pytest.raises(CheckpointError, match=r"aliases .* disagree.*layer\.1\.adapter\.down_proj\.weight"):
        convert_uniadapter_checkpoint(tmp_path / "c.pth", tmp_path / "bb", tmp_path / "set", name="x", **HEADS)


def test_truncated_file_and_pickle_code_are_refused(backbone, tmp_path):
    save_checkpoint(tmp_path / "ok.pth", blip_state(backbone.state_dict(), momentum=False))
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        convert_blip_pth(tmp_path / "cut.pth", tmp_path / "o1", **HEADS)
    torch.save({"model": {}, "args": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="needs pickle code"):
        convert_blip_pth(tmp_path / "evil.pth", tmp_path / "o2", **HEADS)
    assert not (tmp_path / "o2").exists()


class Payload:
    """Stands for any class a checkpoint could smuggle in; weights_only loading must not build it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_merge_itm_and_vqa_folders(backbone, tiny_config, tmp_path):
    from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering

    from uniadapter_serve.model.testing import randomize_

    torch.manual_seed(0)
    itm = randomize_(BlipForImageTextRetrieval(tiny_config), 1)
    vqa = randomize_(BlipForQuestionAnswering(tiny_config), 2)
    itm.save_pretrained(tmp_path / "itm")
    vqa.save_pretrained(tmp_path / "vqa")
    report = merge_backbones([tmp_path / "vqa", tmp_path / "itm"], tmp_path / "merged")
    merged = load_backbone(tmp_path / "merged")
    assert merged.components == ("vision_model", "text_encoder", "text_decoder", "heads")
    assert report["sources"]["heads"] == str(tmp_path / "itm")
    assert report["sources"]["vision_model"] == str(tmp_path / "vqa")
    assert merged.fingerprints["vision_model"] == load_backbone(tmp_path / "vqa").fingerprints["vision_model"]
    assert merged.fingerprints["heads"] == load_backbone(tmp_path / "itm").fingerprints["heads"]


def test_blip_base_shapes_uniadapter_checkpoint(tmp_path):
    """Full BLIP-base shapes (built from config, zeros in fp16 to keep it quick): every key maps, the
    published 512-bottleneck retrieval set comes out at 19.5 M parameters."""
    from uniadapter_serve.model.backbone import BlipBackbone
    from uniadapter_serve.model.loading import load_config
    from uniadapter_serve.model.uniadapter import AdapterSetModule

    config = load_config("blip-base")
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in BlipBackbone(config, ["vision_model", "text_encoder"])
                  .state_dict().items()}
        adapter_shapes = {k: v.shape for k, v in AdapterSetModule(
            UniAdapterConfig.for_task("retrieval", bottleneck=512), BlipBackbone(config).dims).state_dict().items()}
    backbone_state = {k: torch.zeros(shape, dtype=torch.float16) for k, (shape, _) in shapes.items()}
    adapter_state = {k: torch.zeros(shape, dtype=torch.float16) for k, shape in adapter_shapes.items()}
    state = uniadapter_state(backbone_state, adapter_state, vqa=False)
    for key in [k for k in state if k.endswith("_queue") or k == "temp"]:
        del state[key]
    save_checkpoint(tmp_path / "checkpoint_05.pth", state)
    del state, backbone_state
    report = convert_uniadapter_checkpoint(tmp_path / "checkpoint_05.pth", tmp_path / "bb", tmp_path / "set",
                                           name="coco")
    assert report["backbone"]["parameters"]["vision_model"] == 86_090_496
    assert report["backbone"]["parameters"]["text_encoder"] == 137_258_496
    assert report["adapter_set"]["tunable_parameters"] == pytest.approx(19.5e6, abs=0.2e6)
    cfg = report["adapter_set"]["config"]
    assert cfg["bottleneck"] == 512 and cfg["kv_rank"] == 64
    assert cfg["heads"] == ["vision_proj", "text_proj", "itm_head"]
