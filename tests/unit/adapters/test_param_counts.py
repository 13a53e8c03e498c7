"""Tunable-parameter counts at BLIP-base size (built from config on the meta device, nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

from uniadapter_serve.adapters.format import BackboneInfo, read_adapter_meta, save_adapter_set
from uniadapter_serve.adapters.inspect import format_report, inspect_adapter_set
from uniadapter_serve.model.backbone import COMPONENTS, BlipBackbone
from uniadapter_serve.model.loading import load_config
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig


@pytest.fixture(scope="module")
def base_info() -> BackboneInfo:
    with torch.device("meta"):
        backbone = BlipBackbone(load_config("blip-base"))
    fingerprints = {c: "0" * 16 for c in COMPONENTS}
    return BackboneInfo(backbone.dims, fingerprints, backbone.component_parameters())


def test_blip_base_component_sizes(base_info):
    p = base_info.parameters
    # ViT-B/16 at 384 px: 86.09 M; BERT-base with cross-attention (no pooler): 137.26 M
    assert p["vision_model"] == pytest.approx(86.09e6, abs=0.01e6)
    assert p["text_encoder"] == pytest.approx(137.26e6, abs=0.01e6)
    assert p["heads"] == 395_266


def test_per_layer_and_kv_counts_match_the_method(base_info):
    with torch.device("meta"):
        module = AdapterSetModule(UniAdapterConfig.for_task("retrieval", bottleneck=512), base_info.dims)
    layer = module.layer(0)
    assert layer is not None
    assert sum(p.numel() for p in layer.parameters()) == 1_578_752
    assert module.text_encoder_kv is not None
    assert sum(p.numel() for p in module.text_encoder_kv.parameters()) == 198_274


def test_retrieval_set_bottleneck_512_is_the_published_19_5m_and_inspect_reports_it(base_info, tmp_path):
    module = AdapterSetModule(UniAdapterConfig.for_task("retrieval", bottleneck=512), base_info.dims)
    # 19,520,132 in the released code + the 12 cross-modal LayerNorms it froze by accident
    assert module.num_parameters() == 19_520_132 + 12 * 1536
    assert module.num_parameters() == pytest.approx(19.5e6, abs=0.2e6)
    save_adapter_set(module, tmp_path / "base", name="coco", backbone=base_info)
    report = inspect_adapter_set(tmp_path / "base")
    assert report["tunable_parameters"] == module.num_parameters()
    assert report["percent_of_backbone"] == pytest.approx(8.7, abs=0.1)
    assert "19.54 M" in format_report(report)


TASK_BACKBONE = {"retrieval": ("vision_model", "text_encoder", "heads"),
                 "vqa": ("vision_model", "text_encoder", "text_decoder")}


@pytest.mark.parametrize(("task", "bottleneck"), [("retrieval", 64), ("retrieval", 128), ("vqa", 128)])
def test_small_bottlenecks_give_one_to_three_percent(base_info, task, bottleneck):
    """The paper's 1-2 % regime. (A VQA set at 64 is 0.78 %: its backbone adds the 137.7 M decoder.)"""
    with torch.device("meta"):
        module = AdapterSetModule(UniAdapterConfig.for_task(task, bottleneck=bottleneck), base_info.dims)
    base = sum(base_info.parameters[c] for c in TASK_BACKBONE[task])
    assert 1.0 <= 100 * module.num_parameters() / base <= 3.0


def test_inspect_reads_the_header_only(base_info, tmp_path):
    module = AdapterSetModule(UniAdapterConfig.for_task("retrieval", bottleneck=64), base_info.dims)
    save_adapter_set(module, tmp_path / "s", name="s", backbone=base_info)
    meta = read_adapter_meta(tmp_path / "s")
    assert meta.num_parameters == module.num_parameters()
    assert meta.percent_of_backbone() == pytest.approx(100 * module.num_parameters() / 223.75e6, rel=1e-3)
