"""The ViT under bfloat16 autocast from a batch size on (`VisionModel.bf16_from`, the service's VIT_BF16_FROM):
smaller batches are the float32 model bit for bit, larger ones stay close to it with the adapters on
(their projections autocast too), the output is float32 either way, and outputs get bfloat16's tolerances."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig


def _pixels(backbone, n: int) -> torch.Tensor:
    size = int(backbone.config.vision_config.image_size)
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))


@pytest.fixture
def mixed(backbone):
    backbone.vision_model.bf16_from = 4
    yield backbone
    backbone.vision_model.bf16_from = None


@torch.inference_mode()
def test_batches_below_the_threshold_are_the_float32_model(backbone):
    pixels = _pixels(backbone, 3)
    expected = backbone.encode_image(pixels)
    backbone.vision_model.bf16_from = 4
    try:
        got = backbone.encode_image(pixels)
    finally:
        backbone.vision_model.bf16_from = None
    assert torch.equal(got, expected)


@pytest.mark.parametrize("with_set", [False, True])
@torch.inference_mode()
def test_batches_from_the_threshold_autocast_and_stay_close(backbone, mixed, with_set):
    adapter = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8), seed=3) if with_set \
        else None
    pixels = _pixels(backbone, 4)
    routing = Routing.single(adapter, 4)
    vm = backbone.vision_model
    got = backbone.encode_image(pixels, routing)
    vm.bf16_from = None
    expected = backbone.encode_image(pixels, routing)
    vm.bf16_from = 4
    assert got.dtype == torch.float32 and not torch.equal(got, expected)  # bf16 matmuls: not the same numbers
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    itc, itc_expected = backbone.image_features(got, routing), backbone.image_features(expected, routing)
    assert itc.dtype == torch.float32
    assert F.cosine_similarity(itc, itc_expected).min() > 0.999


@torch.inference_mode()
def test_video_frames_count_as_the_batch(backbone, mixed):
    """A clip's frames run through the ViT together: 2 clips of 2 frames are a batch of 4."""
    clips = _pixels(backbone, 4).unflatten(0, (2, 2))
    assert backbone.vision_model.autocasts(4, clips.device)
    got = backbone.encode_video(clips)
    backbone.vision_model.bf16_from = None
    assert not torch.equal(got, backbone.encode_video(clips))


def test_only_a_float32_model_on_a_cpu_autocasts(backbone, mixed):
    vm, cpu = backbone.vision_model, torch.device("cpu")
    assert vm.autocasts(4, cpu) and vm.autocasts(64, cpu) and not vm.autocasts(3, cpu)
    assert not vm.autocasts(4, torch.device("cuda"))
    backbone.to(torch.bfloat16)
    try:
        assert not vm.autocasts(4, cpu)  # already bf16 throughout
        assert backbone.precision == "bfloat16"
    finally:
        backbone.to(torch.float32)


@torch.inference_mode()
def test_a_model_that_autocasts_is_checked_with_bfloat16_tolerances(backbone):
    """A golden record made on the float32 model is reproduced by the same model autocasting its ViT from one
    frame on, within the float32 + bfloat16 tolerances (its record says bfloat16); judged at float32's alone, the
    autocast image probes would not pass."""
    from uniadapter_serve.adapters.golden import Prober, compare
    from uniadapter_serve.model.tokenizer import BlipTokenizer

    prober = Prober(backbone, BlipTokenizer.demo(backbone.config.text_config.vocab_size), ["red", "blue", "no"])
    recorded = prober.record()
    assert recorded.dtype == backbone.precision == "float32"
    backbone.vision_model.bf16_from = 1
    try:
        got = prober.record()
    finally:
        backbone.vision_model.bf16_from = None
    assert got.dtype == "bfloat16"
    assert compare("backbone", recorded, got, prober.tokenizer).ok
    as_float32 = dataclasses.replace(got, dtype="float32")  # the same numbers, claimed computed in float32
    assert not compare("backbone", recorded, as_float32, prober.tokenizer).ok
