"""UniAdapter semantics: zero up-projections are the identity, branches act where the method puts them."""

from __future__ import annotations

import pytest
import torch

from uniadapter_serve.errors import ConfigError
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig
from uniadapter_serve.model.vqa import answer_log_likelihood


@torch.no_grad()
def outputs(backbone: BlipBackbone, adapter: AdapterSetModule | None, seed: int = 3) -> dict[str, torch.Tensor]:
    """Every task path the backbone has, for one batch, through `adapter` (None = bare)."""
    b = random_batch(backbone, 3, seed=seed)
    r = Routing.single(adapter, 3)
    image = backbone.encode_image(b.pixel_values, r)
    frames = b.pixel_values[:, None].expand(3, 2, *b.pixel_values.shape[1:])
    video_tokens = backbone.encode_video(frames, r)
    q = backbone.encode_multimodal(b.input_ids, b.attention_mask, image, routing=r)
    return {
        "image_tokens": image,
        "image_itc": backbone.image_features(image, r),
        "video_itc": backbone.video_features(video_tokens, r),
        "video_states": backbone.video_states(video_tokens, r),
        "text_itc": backbone.text_features(b.input_ids, b.attention_mask, r),
        "itm": backbone.itm_logits(b.input_ids, b.attention_mask, image, r),
        "question": q,
        "answer": answer_log_likelihood(backbone, q, b.attention_mask, b.answer_ids, b.answer_mask, r),
    }


def _vqa(**kw) -> UniAdapterConfig:
    return UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4, **kw)


def _heads_from_backbone(adapter: AdapterSetModule, backbone: BlipBackbone) -> AdapterSetModule:
    for name in ("vision_proj", "text_proj", "itm_head"):
        head = adapter.head(name)
        if head is not None:
            head.load_state_dict(getattr(backbone, name).state_dict())
    return adapter


@pytest.mark.parametrize("task", ["retrieval", "vqa", "videoqa"])
def test_zero_up_projections_equal_bare_backbone_exactly(backbone, task):
    config = UniAdapterConfig.for_task(task, bottleneck=8, kv_rank=4, num_frames=2)
    adapter = random_adapter(backbone, config, seed=5)
    adapter.zero_up_projections()
    if adapter.temporal_embedding is not None:
        adapter.temporal_embedding.zero_()
    _heads_from_backbone(adapter, backbone)
    bare, adapted = outputs(backbone, None), outputs(backbone, adapter)
    for key in bare:
        assert torch.equal(bare[key], adapted[key]), key


def test_fresh_set_equals_bare_backbone(backbone):
    adapter = AdapterSetModule(_vqa(), backbone.dims).eval()  # method init: zero up-projections
    bare, adapted = outputs(backbone, None), outputs(backbone, adapter)
    for key in bare:
        assert torch.equal(bare[key], adapted[key]), key


def test_random_set_changes_every_path_and_unloading_restores_bare_exactly(backbone):
    before = outputs(backbone, None)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    adapter = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4,
                                                                 decoder=True), seed=6)
    adapted = outputs(backbone, adapter)
    for key in ("image_tokens", "image_itc", "text_itc", "itm", "question"):
        assert (adapted[key] - before[key]).abs().max() > 1e-4, key
    after = outputs(backbone, None)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # the backbone's own tensors were never touched
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_vqa_set_adapts_the_answer_decoder(backbone):
    with_dec = random_adapter(backbone, _vqa(), seed=7)
    without = random_adapter(backbone, _vqa(decoder=False), seed=7)
    bare = outputs(backbone, None)
    a, b = outputs(backbone, with_dec), outputs(backbone, without)
    assert torch.equal(a["question"], b["question"])  # same encoder-side weights
    assert not torch.allclose(a["answer"], b["answer"])  # the decoder is adapted only in the first
    assert with_dec.text_decoder_kv is not None and without.text_decoder_kv is None
    assert not torch.allclose(bare["answer"], b["answer"])  # question states changed, so answers do


@pytest.mark.parametrize(
    ("branches", "changes", "unchanged"),
    [
        ({"visual": True, "textual": False, "cross_modal": False, "kv_rank": 0},
         ["image_itc"], ["text_itc"]),
        ({"visual": False, "textual": True, "cross_modal": False, "kv_rank": 0},
         ["text_itc", "itm"], ["image_itc", "image_tokens"]),
        ({"visual": False, "textual": False, "cross_modal": True, "kv_rank": 0},
         ["itm"], ["image_itc", "text_itc"]),
        ({"visual": False, "textual": False, "cross_modal": False, "kv_rank": 4},
         ["itm"], ["image_itc", "text_itc"]),
    ],
    ids=["visual", "textual", "cross_modal", "kv"],
)
def test_each_branch_acts_only_where_the_method_places_it(backbone, branches, changes, unchanged):
    config = UniAdapterConfig(task="retrieval", bottleneck=8, **branches)
    adapter = random_adapter(backbone, config, seed=8)
    bare, adapted = outputs(backbone, None), outputs(backbone, adapter)
    for key in changes:
        assert (adapted[key] - bare[key]).abs().max() > 1e-4, key
    for key in unchanged:
        assert torch.equal(adapted[key], bare[key]), key


def test_cross_modal_branch_reuses_the_textual_up_projection(backbone):
    config = UniAdapterConfig(task="retrieval", bottleneck=8, visual=False, textual=False, kv_rank=0)
    adapter = random_adapter(backbone, config, seed=9)
    layer = adapter.layer(0)
    assert layer is not None and layer.up_proj is not None and layer.multi_up_proj is not None
    x = torch.randn(2, 5, backbone.dims.text_hidden)
    h = torch.relu(layer.down_proj(layer.adapter_layer_norm_before(x)))
    assert layer.adapter_layer_norm_cross_modal is not None
    expected = layer.adapter_layer_norm_cross_modal(layer.multi_up_proj(h) + layer.up_proj(h)) * 0.1
    assert torch.allclose(layer.cross_modal(x), expected)
    assert layer.textual(x) is None  # textual branch off: no query residual


def test_layers_option_limits_adapters(backbone):
    config = UniAdapterConfig(task="retrieval", bottleneck=8, layers=[1])
    adapter = AdapterSetModule(config, backbone.dims)
    assert adapter.layer(0) is None and adapter.layer(1) is not None
    with pytest.raises(ConfigError, match="do not exist"):
        AdapterSetModule(UniAdapterConfig(task="retrieval", layers=[5]), backbone.dims)


@pytest.mark.parametrize(
    "bad",
    [{"task": "captioning"}, {"bottleneck": 0}, {"kv_rank": -1}, {"heads": ["lm_head"]}, {"num_frames": 0},
     {"scale": float("nan")}],
)
def test_invalid_configs_name_the_field(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        UniAdapterConfig(**bad)


def test_temporal_embedding_is_added_per_frame(backbone):
    config = UniAdapterConfig.for_task("videoqa", bottleneck=8, num_frames=2)
    adapter = AdapterSetModule(config, backbone.dims).eval()
    assert adapter.temporal_embedding is not None
    with torch.no_grad():
        adapter.temporal_embedding[0, 1].fill_(1.0)
    tokens = torch.randn(1, 2, 3, backbone.dims.vision_hidden)
    states = backbone.video_states(tokens, Routing.single(adapter, 1))
    assert states.shape == (1, 6, backbone.dims.vision_hidden)
    assert torch.equal(states[0, :3], tokens[0, 0])
    assert torch.equal(states[0, 3:], tokens[0, 1] + 1.0)
