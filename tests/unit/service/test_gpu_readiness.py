"""The GPU paths' logic, run on the CPU: FAISS device choice and its self-test, every call on a "GPU"
index made on the one FAISS thread, tombstones compacted, snapshots through a CPU copy, results moved to
the host once per batch, float32 ITC normalisation, device copies straight from the source tensors.

`FakeGpu` is a FAISS device whose "GPU copy" of an index is the CPU index behind a proxy that records the
thread of every call and, like `GpuIndexFlat`, cannot remove ids: the code under test takes its GPU paths.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch

from uniadapter_serve.adapters.manager import device_copy
from uniadapter_serve.model import stages
from uniadapter_serve.model.loading import random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import VisionInput
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.tokenizer import BlipTokenizer
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.service.collections import faiss_device
from uniadapter_serve.service.collections.collection import SNAPSHOT_FILE, Collection
from uniadapter_serve.service.collections.faiss_device import FaissDevice, GpuWorker
from uniadapter_serve.service.collections.index import COMPACT_AT, VectorIndex
from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend
from uniadapter_serve.service.collections.store import NewItem

DIM = 16


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class RecordingIndex:
    """A CPU index standing in for a GPU one: records calling threads, cannot remove ids."""

    def __init__(self, inner: Any, threads: list[str]) -> None:
        self.inner, self.threads = inner, threads

    def _note(self) -> None:
        self.threads.append(threading.current_thread().name)

    @property
    def ntotal(self) -> int:
        return int(self.inner.ntotal)

    @property
    def is_trained(self) -> bool:
        return bool(self.inner.is_trained)

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        self._note()
        self.inner.add_with_ids(x, ids)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self._note()
        if k > 2048:
            raise RuntimeError("FAISS GPU searches take k <= 2048")
        return self.inner.search(x, k)

    def remove_ids(self, ids: np.ndarray) -> int:
        self._note()
        raise RuntimeError("GpuIndexFlat cannot remove ids")


class FakeGpu(FaissDevice):
    def __init__(self) -> None:
        super().__init__(gpu=0, warning=None, worker=GpuWorker(0))
        self.threads: list[str] = []

    def to_gpu(self, index: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return RecordingIndex(index, self.threads)

    def to_cpu(self, index: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return index.inner


@pytest.fixture
def fake_gpu():
    device = FakeGpu()
    yield device
    device.close()


# -- choosing the device --------------------------------------------------------------------------

def test_auto_uses_the_gpu_only_when_the_self_test_passes_there():
    cuda1 = torch.device("cuda", 1)
    tested: list[int] = []

    def passes(gpu: int) -> tuple[bool, str]:
        tested.append(gpu)
        return True, "passed"

    chosen = faiss_device.choose("auto", cuda1, has_gpu=lambda: True, test=passes)
    try:
        assert chosen.gpu == 1 and chosen.warning is None and tested == [1]  # the backbone's GPU, not GPU 0
    finally:
        chosen.close()
    failed = faiss_device.choose("auto", cuda1, has_gpu=lambda: True, test=lambda g: (False, "no kernel image"))
    assert failed.gpu is None and "no kernel image" in (failed.warning or "")
    no_faiss_gpu = faiss_device.choose("gpu", cuda1, has_gpu=lambda: False, test=passes)
    assert no_faiss_gpu.gpu is None and "faiss-gpu>=1.15" in (no_faiss_gpu.warning or "")
    assert faiss_device.choose("cpu", cuda1, has_gpu=lambda: True, test=passes).gpu is None
    assert faiss_device.choose("auto", torch.device("cpu")).warning is None  # a CPU backbone: nothing to say
    assert tested == [1]


@pytest.mark.parametrize(("cc", "serves", "does_not"), [
    ((6, 1), "no current FAISS GPU build", "faiss-gpu>=1.15 serves"),
    ((8, 6), "faiss-gpu>=1.15 (7.0-9.0) serves it, as does the community faiss-gpu-cu12", "does not"),
    ((9, 0), "faiss-gpu>=1.15 serves it (sm_90 kernels); the community faiss-gpu-cu12 (7.0-8.9) does not", "conda"),
    ((12, 0), "conda's faiss-gpu or faiss-gpu-cuvs 1.15", "faiss-gpu>=1.15 serves"),
])
def test_a_degraded_warning_names_the_build_that_serves_the_gpu(monkeypatch, cc, serves, does_not):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda gpu: cc)
    failed = faiss_device.choose("gpu", torch.device("cuda", 0), has_gpu=lambda: True,
                                 test=lambda g: (False, "CUDA error 209 no kernel image"))
    warning = failed.warning or ""
    assert failed.gpu is None and "no kernel image" in warning
    assert f"compute capability {cc[0]}.{cc[1]}; " in warning and serves in warning and does_not not in warning


def test_the_self_test_survives_a_process_that_aborts():
    ok, why = faiss_device.self_test(0, code="import os; os.abort()")
    assert not ok and "signal 6" in why
    ok, why = faiss_device.self_test(0, code="import sys; print('faiss-gpu-ok'); sys.exit(0)")
    assert ok
    ok, why = faiss_device.self_test(0, code="raise SystemExit('CUDA error 209 no kernel image')")
    assert not ok and "no kernel image" in why


# -- one thread for every call on a GPU index ---------------------------------------------------------

def test_every_call_on_a_gpu_index_runs_on_the_faiss_thread(fake_gpu):
    index = VectorIndex(DIM, device=fake_gpu)
    assert index.gpu
    x = unit(400, 1)
    index.add(np.arange(200), x[:200])

    def work(i: int) -> None:
        if i % 3 == 0:
            index.add(np.arange(200 + i, 201 + i), x[200 + i:201 + i])
        elif i % 3 == 1:
            index.remove(np.array([i]))
        else:
            index.search(x[i:i + 1], 5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(150)))
    assert fake_gpu.threads and set(fake_gpu.threads) == {fake_gpu.worker.thread.name}


# -- tombstones compacted -----------------------------------------------------------------------------------

def compaction_case(tmp_path, device: FaissDevice, factory: str) -> Collection:
    backend = SqliteBackend(tmp_path / "collections")
    backend.create("c", "image", "none", factory, DIM)
    coll = Collection(backend.open("c"), backend.local_dir("c"), backend.media_dir("c"), device=device)
    n = COMPACT_AT + 600
    x = unit(n, 2)
    coll.store.add([NewItem(f"x{i}", "upload:x", None, {"i": i}, v) for i, v in enumerate(x)], 0)
    coll.sync()
    for i in range(COMPACT_AT + 1):
        coll.store.delete(f"x{i}")
    coll.sync()
    assert coll.index.tombstones == 0  # rebuilt without them
    assert coll.index.ntotal == n - COMPACT_AT - 1 == coll.store.count()
    hits = coll.search(x[COMPACT_AT + 10], 5)
    assert hits[0].item.external_id == f"x{COMPACT_AT + 10}"
    assert all(int(h.item.external_id[1:]) > COMPACT_AT for h in hits)
    return coll


def test_deletions_a_gpu_flat_index_cannot_remove_are_compacted(tmp_path, fake_gpu):
    compaction_case(tmp_path, fake_gpu, "flat")


def test_deletions_hnsw_cannot_remove_are_compacted_on_the_cpu(tmp_path):
    compaction_case(tmp_path, faiss_device.CPU, "HNSW16")


def test_tombstones_never_push_a_gpu_search_past_its_k_limit(fake_gpu):
    index = VectorIndex(DIM, device=fake_gpu)
    x = unit(3000, 3)
    index.add(np.arange(3000), x)
    index.remove(np.arange(2500))  # 2,500 tombstones (a collection compacts long before)
    _, ids = index.search(x[2900:2901], 10)
    assert ids[0, 0] == 2900 and len(ids[0]) == 10


# -- snapshots through a CPU copy ---------------------------------------------------------------------------

def test_snapshots_of_gpu_indexes_are_cpu_copies_and_load_back_on_the_gpu(tmp_path, fake_gpu):
    for factory in ("flat", "IVF64,Flat"):  # the second is served from a GPU flat index until it trains
        index = VectorIndex(DIM, factory, device=fake_gpu)
        assert index.gpu
        x = unit(50, 4)
        index.add(np.arange(50), x)
        index.seq = 7
        path = tmp_path / f"{factory}.snap"
        index.save(path)
        loaded = VectorIndex.load(path, DIM, factory, device=fake_gpu)
        assert loaded.gpu and loaded.seq == 7 and loaded.ntotal == 50
        assert loaded.search(x[3:4], 1)[1][0, 0] == 3


def test_a_failing_snapshot_never_fails_the_write_that_triggered_it(tmp_path, monkeypatch):
    backend = SqliteBackend(tmp_path / "collections")
    coll = Collection(backend.create("c", "image", "none", "flat", DIM), backend.local_dir("c"), backend.media_dir("c"))
    monkeypatch.setattr("uniadapter_serve.service.collections.collection.SNAPSHOT_EVERY_OPS", 5)

    def broken(path: Any) -> None:
        raise RuntimeError("cannot serialise")

    monkeypatch.setattr(coll.index, "save", broken)
    coll.store.add([NewItem(f"x{i}", "upload:x", None, {}, v) for i, v in enumerate(unit(10, 5))], 0)
    coll.sync()  # would raise before
    assert coll.index.ntotal == 10 and not (coll.folder / SNAPSHOT_FILE).exists()


# -- results to the host once per batch; float32 normalisation ---------------------------------------------

@pytest.fixture(scope="module")
def demo_backbone():
    return random_backbone("blip-tiny", seed=3).eval().requires_grad_(False)


def test_each_stage_moves_its_results_to_the_host_once_per_batch(demo_backbone, monkeypatch):
    calls: list[int] = []
    real = stages.to_host
    monkeypatch.setattr(stages, "to_host", lambda *t: (calls.append(len(t)), real(*t))[1])
    handlers = stages.make_stages(demo_backbone, BlipTokenizer.demo(demo_backbone.config.text_config.vocab_size))
    b = random_batch(demo_backbone, 3, seed=4)
    jobs = list
    texts_in = ["a red circle", "two blue squares on the left", "a cat"]
    with torch.inference_mode():
        visual = handlers["vision"](jobs([VisionInput(b.pixel_values[i:i + 1]) for i in range(3)]),
                                    Routing.none(3))
        texts = handlers["text"](jobs([stages.TextInput(t) for t in texts_in]), Routing.none(3))
        itm = handlers["itm"](jobs([stages.MatchInput(t, visual[i].states) for i, t in enumerate(texts_in)]),
                              Routing.none(3))
        cands = (b.answer_ids, b.answer_mask)
        plans = [stages.RankPlan(cands, k=2, top_k=2), stages.GeneratePlan(max_length=4, top_k=1),
                 stages.RankPlan(cands, k=3, top_k=2)]
        answers = handlers["answer"](jobs([stages.AnswerInput(t, visual[i].states, plan)
                                           for i, (t, plan) in enumerate(zip(texts_in, plans, strict=True))]),
                                     Routing.none(3))
    assert len(calls) == 4  # one per batch, whatever the batch size or the mix of answer modes
    assert all(v.embedding.device.type == "cpu" and v.embedding.dtype == torch.float32 for v in visual)
    assert all(t.device.type == "cpu" for t in texts) and all(isinstance(p, float) for p in itm)
    assert answers[0].indices is not None and answers[1].texts is not None


def test_itc_embeddings_are_normalised_in_float32(demo_backbone):
    half = random_backbone("blip-tiny", seed=3).to(torch.bfloat16).eval()
    b = random_batch(demo_backbone, 4, seed=5)
    with torch.inference_mode():
        image = half.image_features(half.encode_image(b.pixel_values.bfloat16()))
        text = half.text_features(b.input_ids, b.attention_mask)
    for emb in (image, text):
        assert emb.dtype == torch.float32
        assert (emb.norm(dim=-1) - 1).abs().max() < 1e-6  # a bf16 norm is off by ~4e-3


# -- device copies straight from the source tensors ---------------------------------------------------------

def test_device_copies_take_every_tensor_straight_from_the_source(demo_backbone, monkeypatch):
    module = random_adapter(demo_backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), seed=6)
    cloned: list[torch.Size] = []
    real_clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: (cloned.append(t.shape), real_clone(t, *a, **k))[1])
    copy = device_copy(module, torch.device("meta"))
    tensors = dict(copy.state_dict())
    assert tensors and all(t.device.type == "meta" for t in tensors.values())
    assert sorted(tensors) == sorted(module.state_dict())
    assert not cloned  # no CPU clone on the way (a deepcopy of the source would clone every tensor)
    assert device_copy(module, torch.device("cpu")) is module  # the CPU tier's module is the device module
