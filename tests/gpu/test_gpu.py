"""GPU paths: half-precision backbones with adapters, mixed batches on the device, the CUDA-only branches of
the stages (frame uploads from page-locked memory), the adapter manager's CPU tier -> device copies, and
FAISS GPU indexes (self-test, save, compaction). Skipped without CUDA; `scripts/gpu-check.sh` runs them.

Tolerances come from measured error: on the blip-demo config with adapters of std 0.1, fp16 differs from
fp32 by at most 8e-4 and bf16 by at most 5.8e-3 over image/text ITC, ITM logits and VQA log-likelihoods
(CPU kernels; GPU kernels accumulate in fp32 as well). The tolerances are ~4x that, and every test checks
that the adapter's own effect is larger than twice the tolerance, so it fails if the adapter is ignored.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniadapter_serve.adapters.format import BackboneInfo
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.loading import random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.model.vqa import answer_log_likelihood

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
ADAPTER_STD = 0.1


def backbone_on(device: str, dtype: torch.dtype):
    return random_backbone("blip-demo", seed=0).to(device=device, dtype=dtype).eval().requires_grad_(False)


def outputs(bb, adapter, b) -> dict[str, torch.Tensor]:
    n = b.pixel_values.shape[0]
    r = Routing.single(adapter, n) if adapter is not None else Routing.none(n)
    with torch.inference_mode():
        image = bb.encode_image(b.pixel_values.to(bb.device, bb.dtype), r)
        ids, mask = b.input_ids.to(bb.device), b.attention_mask.to(bb.device)
        q = bb.encode_multimodal(ids, mask, image, routing=r)
        out = {"image_itc": bb.image_features(image, r), "text_itc": bb.text_features(ids, mask, r),
               "itm": bb.itm_logits(ids, mask, image, r),
               "vqa_ll": answer_log_likelihood(bb, q, mask, b.answer_ids.to(bb.device), b.answer_mask.to(bb.device),
                                               r)}
    return {k: v.float().cpu() for k, v in out.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_with_an_adapter_matches_fp32(dtype):
    config = UniAdapterConfig.for_task("vqa", bottleneck=32, kv_rank=8)
    ref = backbone_on("cpu", torch.float32)
    b = random_batch(ref, 8, seed=2)
    expected = outputs(ref, random_adapter(ref, config, seed=1, std=ADAPTER_STD), b)
    bare = outputs(ref, None, b)
    half = backbone_on("cuda", dtype)
    got = outputs(half, random_adapter(half, config, seed=1, std=ADAPTER_STD), b)
    tol = TOLERANCE[dtype]
    for key in expected:
        effect = (expected[key] - bare[key]).abs().max().item()
        assert effect > 2 * tol, f"{key}: the adapter's effect ({effect:.1e}) is within the tolerance"
        err = (got[key] - expected[key]).abs().max().item()
        assert err < tol, f"{key}: {dtype} differs from fp32 by {err:.1e} (tolerance {tol:.0e})"
    assert all(v.dtype == torch.float32 for k, v in got.items() if k.endswith("itc"))


def test_mixed_batch_on_gpu_equals_each_sample_alone():
    # fp32 without TF32 (which rounds matmul inputs to 10 bits): batch size then changes only the kernels'
    # summation order, ~1e-6 relative; 1e-4 on log-likelihoods summed over answer tokens leaves room
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        backbone = backbone_on("cuda", torch.float32)
        sets = [random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=16), seed=s, std=ADAPTER_STD)
                for s in (1, 2, 3)]
        assignment = [sets[0], None, sets[1], sets[2], sets[0]]
        b = random_batch(backbone, len(assignment), seed=3)
        with torch.inference_mode():
            r = Routing.per_sample(assignment, backbone.device)
            image = backbone.encode_image(b.pixel_values, r)
            q = backbone.encode_multimodal(b.input_ids, b.attention_mask, image, routing=r)
            mixed = answer_log_likelihood(backbone, q, b.attention_mask, b.answer_ids, b.answer_mask, r)
            alone = []
            for i, adapter in enumerate(assignment):
                r1 = Routing.single(adapter, 1)
                img1 = backbone.encode_image(b.pixel_values[i:i + 1], r1)
                q1 = backbone.encode_multimodal(b.input_ids[i:i + 1], b.attention_mask[i:i + 1], img1, routing=r1)
                alone.append(answer_log_likelihood(backbone, q1, b.attention_mask[i:i + 1], b.answer_ids[i:i + 1],
                                                   b.answer_mask[i:i + 1], r1)[0])
        alone_t = torch.stack(alone)
        assert (mixed - alone_t).abs().max() < 1e-4
        assert (alone_t[0] - alone_t[1]).abs() > 1e-2  # the sets do change the answer scores
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_vision_stage_uploads_frames_and_returns_host_results():
    from uniadapter_serve.model import stages

    backbone = backbone_on("cuda", torch.float16)
    from uniadapter_serve.model.stages import VisionInput
    from uniadapter_serve.model.tokenizer import BlipTokenizer

    handlers = stages.make_stages(backbone, BlipTokenizer.demo(backbone.config.text_config.vocab_size))
    size = backbone.config.vision_config.image_size
    frames = torch.randn(4, 3, size, size)
    jobs = [VisionInput(frames[:1]), VisionInput(frames, video=True)]
    with torch.inference_mode():
        out = handlers["vision"](jobs, Routing.none(2))
    assert out[0].states.device.type == "cuda" and out[0].embedding.device.type == "cpu"
    assert out[0].embedding.dtype == torch.float32 and abs(out[0].embedding.norm().item() - 1) < 1e-5
    cpu = backbone_on("cpu", torch.float32)
    with torch.inference_mode():
        ref = cpu.image_features(cpu.encode_image(frames[:1]))[0]
    assert (out[0].embedding - ref).abs().max() < TOLERANCE[torch.float16]


def test_cpu_tier_sets_come_back_to_the_device_from_pinned_memory(tmp_path):
    backbone = backbone_on("cuda", torch.float16)  # fingerprints are taken before the cast: sets still fit
    registry = AdapterRegistry(tmp_path / "adapters")
    cpu_ref = backbone_on("cpu", torch.float32)
    for i, name in enumerate("ab"):
        module = random_adapter(cpu_ref, UniAdapterConfig.for_task("vqa", bottleneck=16), seed=i, std=ADAPTER_STD)
        registry.publish(module, name, BackboneInfo.of(cpu_ref))
    one_set = registry.resolve("a")
    size = one_set.num_parameters * 2
    manager = AdapterManager(backbone, registry, device_budget_bytes=size + size // 2, cpu_budget_bytes=4 * size)
    first = manager.load("a")
    with manager.lease("a") as held:
        before = {k: v.float().cpu() for k, v in held.module.state_dict().items()}
    manager.load("b")  # evicts a to the CPU tier
    assert [r["tier"] for r in manager.table() if r["ref"] == first.ref] == ["cpu"]
    assert all(t.is_pinned() for t in manager._cpu[first.ref].module.state_dict().values())
    manager.load("a")  # back from the pinned copy, not from disk
    assert manager.stats["cpu_hits"] == 1 and manager.stats["disk_loads"] == 2
    with manager.lease("a") as held:
        after = held.module.state_dict()
        assert all(v.device.type == "cuda" for v in after.values())
        assert all(torch.equal(before[k], v.float().cpu()) for k, v in after.items())


def faiss_gpu_or_skip():
    from uniadapter_serve.service.collections import faiss_device

    chosen = faiss_device.choose("gpu", torch.device("cuda", torch.cuda.current_device()))
    if not chosen.on_gpu:
        pytest.skip(f"FAISS cannot run on this GPU: {chosen.warning}")
    return chosen


def test_faiss_gpu_index_matches_cpu_and_compacts_and_snapshots(tmp_path):
    from uniadapter_serve.service.collections.faiss_device import CPU
    from uniadapter_serve.service.collections.index import COMPACT_AT, VectorIndex

    device = faiss_gpu_or_skip()
    try:
        x = np.random.default_rng(0).normal(size=(5000, 64)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        cpu, gpu = VectorIndex(64), VectorIndex(64, device=device)
        assert gpu.gpu and not cpu.gpu
        for index in (cpu, gpu):
            index.add(np.arange(5000), x)
            index.remove(np.arange(COMPACT_AT + 5))
        assert gpu.tombstones == COMPACT_AT + 5 and gpu.needs_compaction
        s_cpu, i_cpu = cpu.search(x[2000:2050], 10)
        s_gpu, i_gpu = gpu.search(x[2000:2050], 10)
        assert (i_cpu == i_gpu).mean() > 0.99 and np.abs(s_cpu - s_gpu).max() < 1e-4
        assert not np.isin(i_gpu, np.arange(COMPACT_AT + 5)).any()
        gpu.rebuild(np.arange(COMPACT_AT + 5, 5000), x[COMPACT_AT + 5:])
        assert gpu.tombstones == 0 and gpu.ntotal == 5000 - COMPACT_AT - 5
        gpu.save(tmp_path / "snap")
        for target in (device, CPU):
            loaded = VectorIndex.load(tmp_path / "snap", 64, "flat", device=target)
            assert loaded.search(x[3000:3001], 1)[1][0, 0] == 3000
        fallback = VectorIndex(64, "IVF64,Flat", device=device)  # served by a GPU flat index until it trains
        fallback.add(np.arange(100), x[:100])
        fallback.save(tmp_path / "fallback")
        assert VectorIndex.load(tmp_path / "fallback", 64, "IVF64,Flat", device=device).ntotal == 100
    finally:
        device.close()


def test_the_service_runs_on_the_gpu(tmp_path):
    import base64

    import httpx
    from support.media import image_bytes
    from support.server import publish_test_sets, start_server

    root = tmp_path / "data"
    publish_test_sets(root)
    server = start_server(root, tmp_path, device="cuda", dtype="float16")
    try:
        png = base64.b64encode(image_bytes()).decode()
        r = httpx.post(f"{server.url}/vqa", json={"image": png, "question": "what colour?", "adapter": "vqa-a"},
                       timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.post(f"{server.url}/collections", json={"name": "g", "kind": "image", "adapter": "ret-a"}
                          ).status_code == 201
        r = httpx.post(f"{server.url}/collections/g/items", timeout=60,
                       json={"items": [{"id": str(i), "image": base64.b64encode(image_bytes((30 * i, 0, 0))).decode()}
                                       for i in range(8)]})
        assert r.status_code == 201, r.text
        assert httpx.delete(f"{server.url}/collections/g/items/3").status_code == 204
        hits = httpx.post(f"{server.url}/retrieve", json={"query_text": "red", "collection": "g", "top_k": 8},
                          timeout=60).json()["results"]
        assert len(hits) == 7 and "3" not in {h["id"] for h in hits}
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready" and ready["checks"]["faiss"] in ("gpu", "degraded")
    finally:
        server.stop()
    assert "Traceback" not in server.log.read_text()
