"""GPU paths: half-precision backbones, mixed batches on the device, FAISS on the GPU.
Skipped on machines without CUDA; run them where a GPU is lent (pytest -m gpu)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniadapter_serve.model.loading import load_backbone, random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.model.vqa import answer_log_likelihood

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_half_precision_backbone_matches_fp32(dtype, tol):
    ref = random_backbone("blip-demo")
    ref.requires_grad_(False).eval()
    half = load_backbone("blip-demo", device="cuda", dtype=dtype)
    assert half.fingerprints == ref.fingerprints
    adapter = random_adapter(ref, UniAdapterConfig.for_task("vqa", bottleneck=32), seed=1, std=0.02)
    adapter_half = random_adapter(half, UniAdapterConfig.for_task("vqa", bottleneck=32), seed=1, std=0.02)
    b = random_batch(ref, 4, seed=2)
    with torch.no_grad():
        r = Routing.single(adapter, 4)
        itc = ref.image_features(ref.encode_image(b.pixel_values, r), r)
        r_half = Routing.single(adapter_half, 4)
        itc_half = half.image_features(half.encode_image(b.pixel_values.cuda(), r_half), r_half)
    assert (itc_half.float().cpu() - itc).abs().max() < tol


def test_mixed_batch_on_gpu_equals_alone():
    backbone = load_backbone("blip-demo", device="cuda", dtype=torch.float32)
    sets = [random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=16), seed=s) for s in (1, 2, 3)]
    assignment = [sets[0], None, sets[1], sets[2], sets[0]]
    b = random_batch(backbone, len(assignment), seed=3)
    with torch.no_grad():
        r = Routing.per_sample(assignment, backbone.device)
        image = backbone.encode_image(b.pixel_values, r)
        q = backbone.encode_multimodal(b.input_ids, b.attention_mask, image, routing=r)
        mixed = answer_log_likelihood(backbone, q, b.attention_mask, b.answer_ids, b.answer_mask, r)
        for i, adapter in enumerate(assignment):
            r1 = Routing.single(adapter, 1)
            img1 = backbone.encode_image(b.pixel_values[i:i + 1], r1)
            q1 = backbone.encode_multimodal(b.input_ids[i:i + 1], b.attention_mask[i:i + 1], img1, routing=r1)
            alone = answer_log_likelihood(backbone, q1, b.attention_mask[i:i + 1], b.answer_ids[i:i + 1],
                                          b.answer_mask[i:i + 1], r1)
            assert (mixed[i] - alone[0]).abs() < 1e-4


def test_faiss_gpu_flat_index_matches_cpu():
    from uniadapter_serve.service.collections.index import VectorIndex, faiss_gpu_available

    if not faiss_gpu_available():
        pytest.skip("faiss without GPU support (install the gpu extra: faiss-gpu)")
    x = np.random.default_rng(0).normal(size=(5000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cpu, gpu = VectorIndex(64), VectorIndex(64, gpu=True)
    assert gpu.gpu
    for index in (cpu, gpu):
        index.add(np.arange(5000), x)
        index.remove(np.array([7]))
    s_cpu, i_cpu = cpu.search(x[:50], 10)
    s_gpu, i_gpu = gpu.search(x[:50], 10)
    assert (i_cpu == i_gpu).mean() > 0.99 and np.abs(s_cpu - s_gpu).max() < 1e-4
    assert 7 not in i_gpu
