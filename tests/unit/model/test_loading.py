"""`load_backbone`: every source it accepts and every way a checkpoint can be wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import BlipForImageTextRetrieval

from uniadapter_serve.errors import CheckpointError, ConfigError, InputError
from uniadapter_serve.model import loading
from uniadapter_serve.model.loading import (
    DEMO_DIR,
    backbone_from_state_dict,
    bundled_configs,
    load_backbone,
    load_config,
    local_folder,
)


def _write(folder, config, state):
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def test_bundled_configs_build_random_backbones():
    assert {"blip-base", "blip-demo", "blip-tiny"} <= set(bundled_configs())
    model = load_backbone("blip-tiny")
    assert model.components == ("vision_model", "text_encoder", "text_decoder", "heads")
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training


def test_demo_source_is_the_shipped_backbone():
    model = load_backbone("demo")
    assert (model.config.vision_config.image_size, model.config.vision_config.patch_size) == (96, 12)
    assert local_folder("demo") == DEMO_DIR
    assert model.fingerprints == load_backbone(DEMO_DIR).fingerprints != load_backbone("blip-demo").fingerprints


def test_demo_source_without_shipped_weights_is_the_seeded_random_model(monkeypatch, tmp_path):
    monkeypatch.setattr(loading, "DEMO_DIR", tmp_path)
    assert loading.local_folder("demo") is None
    assert load_backbone("demo").fingerprints == load_backbone("blip-demo").fingerprints


def test_dtype_cast_keeps_fingerprints(backbone, tiny_config, tmp_path):
    folder = _write(tmp_path / "bb", tiny_config, backbone.state_dict())
    fp32 = load_backbone(folder)
    bf16 = load_backbone(folder, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert bf16.fingerprints == fp32.fingerprints == backbone.fingerprints


def test_itm_checkpoint_has_no_decoder(tiny_config, tmp_path):
    hf = BlipForImageTextRetrieval(tiny_config)
    hf.save_pretrained(tmp_path)
    model = load_backbone(tmp_path)
    assert model.text_decoder is None and "text_decoder" not in model.fingerprints
    with pytest.raises(InputError, match="no answer decoder"):
        model.decoder_logits(torch.ones(1, 2, dtype=torch.long), None, torch.zeros(1, 3, 32), None)


def test_sharded_checkpoint(backbone, tiny_config, tmp_path):
    state = backbone.state_dict()
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    tiny_config.to_json_file(tmp_path / "config.json")
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / name))
        weight_map.update(dict.fromkeys(ks, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert load_backbone(tmp_path).fingerprints == backbone.fingerprints


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update({"text_encoder.encoder.layer.9.output.dense.bias": torch.zeros(2)}), "unexpected keys"),
        (lambda s: s.update({"some.other.weight": torch.zeros(2)}), "unexpected keys"),
        (lambda s: s.pop("vision_model.post_layernorm.bias"), "missing keys.*post_layernorm"),
        (lambda s: s.update({"vision_model.post_layernorm.bias": torch.zeros(7)}),
         r"post_layernorm.bias: checkpoint shape \(7,\)"),
        (lambda s: [s.pop("itm_head.weight"), s.pop("itm_head.bias")], "retrieval heads are partial"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("vision_model.")], "lacks.*vision_model"),
        (lambda s: s.update({"text_decoder.cls.predictions.decoder.bias": torch.ones(128)}), "untied"),
    ],
    ids=["extra-layer", "foreign", "missing", "shape", "partial-heads", "no-vision", "untied"],
)
def test_bad_state_dicts_name_the_problem(backbone, tiny_config, edit, message):
    state = dict(backbone.state_dict())
    edit(state)
    with pytest.raises(CheckpointError, match=message):
        backbone_from_state_dict(tiny_config, state)


def test_pooler_weights_are_ignored(backbone, tiny_config):
    state = dict(backbone.state_dict())
    state["text_encoder.pooler.dense.weight"] = torch.zeros(32, 32)
    assert backbone_from_state_dict(tiny_config, state).fingerprints == backbone.fingerprints


def test_folder_errors(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_backbone(tmp_path)
    tiny_config.to_json_file(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_backbone(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="invalid BLIP config"):
        load_backbone(tmp_path)


def test_unknown_source_is_explained(tmp_path):
    with pytest.raises(CheckpointError, match="bundled config"):
        load_backbone(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no config"):
        load_config("blip-huge")
