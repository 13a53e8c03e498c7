"""Golden records through the service: a set is checked against its record before it first serves on this device
and dtype (a tampered record or a perturbed model is refused, 409 naming the probe), a pass is remembered across hot
swaps, a float32 record passes in bfloat16, a backbone that fails its record keeps the server unready, publishing
records (or verifies an uploaded record), and the live self-check catches a mixed batch routed wrongly."""

from __future__ import annotations

import base64
import itertools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from support.asgi import running_app, server_objects
from support.inprocess import start_in_process
from support.media import image_bytes
from support.server import ANSWERS, publish_test_sets
from support.waiting import until

from uniadapter_serve.adapters.format import BackboneInfo, read_adapter_meta, save_adapter_set
from uniadapter_serve.adapters.golden import GOLDEN_FILE, Prober, backbone_fingerprint, write_record
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.tokenizer import load_answer_list, load_tokenizer
from uniadapter_serve.model.uniadapter import UniAdapterConfig

PNG = base64.b64encode(image_bytes()).decode()


def tiny_prober(dtype: torch.dtype = torch.float32) -> Prober:
    backbone = load_backbone("blip-tiny", dtype=dtype)
    return Prober(backbone, load_tokenizer("blip-tiny", backbone.config), load_answer_list(None))


def tamper(folder: Path, probe: str, by: float = 1.0, file: str = GOLDEN_FILE) -> None:
    doc = json.loads((folder / file).read_text())
    doc["probes"][probe]["values"][0][0] += by
    (folder / file).write_text(json.dumps(doc))


def publish_extra(root: Path, name: str, task: str, seed: int) -> Path:
    """One more recorded set in `root`'s registry; returns its folder."""
    prober = tiny_prober()
    module = random_adapter(prober.backbone, UniAdapterConfig.for_task(task, bottleneck=8, kv_rank=4), seed=seed)
    meta = AdapterRegistry(root / "adapters").publish(
        module, name, BackboneInfo.of(prober.backbone), answer_list=ANSWERS if task != "retrieval" else None,
        golden=lambda m: prober.record(module, ref=m.ref, answer_list=m.answer_list))
    return meta.path


def golden_count(client: httpx.Client, subject: str, result: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("uniadapter_golden_checks_total{") and f'subject="{subject}"' in line \
                and f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    refs = publish_test_sets(root)
    publish_extra(root, "ret-tampered", "retrieval", 7)
    tamper(AdapterRegistry(root / "adapters").resolve("ret-tampered").path, "text_itc", by=0.5)
    publish_extra(root, "ret-perturbed", "retrieval", 8)
    with running_app(root, backbone="blip-tiny") as service:
        service.refs = refs
        yield service


@pytest.fixture(scope="module")
def client(app):
    with app.client() as c:
        yield c


def test_a_tampered_record_refuses_the_set_and_names_the_probe(client):
    loaded = client.post("/adapters/ret-tampered/load")
    assert loaded.status_code == 409, loaded.text
    detail = loaded.json()["detail"]
    assert "text_itc[0]" in detail and "tolerance" in detail and "ret-tampered@" in detail, detail
    search = client.post("/retrieve", json={"query_text": "a red square", "candidate_images": [PNG],
                                            "adapter": "ret-tampered"})
    assert search.status_code == 409 and "text_itc[0]" in search.json()["detail"]
    assert client.get("/adapters/ret-tampered").json().get("resident") in (False, None)
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["golden"] == "degraded", ready.json()
    sets = client.get("/readyz", params={"verbose": "true"}).json()["details"]["golden"]["sets"]
    (ref,) = [r for r in sets if r.startswith("ret-tampered@")]
    assert sets[ref]["result"] == "mismatch"
    assert golden_count(client, "set", "mismatch") >= 1


def test_a_pass_is_remembered_across_hot_swaps(app, client):
    engine = server_objects(app).engine
    assert client.post("/adapters/ret-a/load").status_code == 200
    ref = app.refs["ret-a"]
    assert engine.verification()["sets"][ref]["result"] == "pass"
    passes = golden_count(client, "set", "pass")
    probes: list[object] = []
    real = engine.verifier.prober.record
    engine.verifier.prober.record = lambda *a, **k: probes.append(a) or real(*a, **k)
    try:
        for _ in range(2):  # evicted from both tiers and loaded from disk again: not probed again
            assert client.post(f"/adapters/{ref}/unload").status_code == 200
            assert client.post(f"/adapters/{ref}/load").status_code == 200
    finally:
        engine.verifier.prober.record = real
    assert probes == [] and golden_count(client, "set", "pass") == passes


def test_a_perturbed_layer_is_refused(app, client):
    backbone = server_objects(app).engine.backbone
    generator = torch.Generator().manual_seed(0)

    def noisy(module, inputs, output):
        return output + 0.2 * torch.randn(output.shape, generator=generator).to(output)

    hook = backbone.text_encoder.register_forward_hook(noisy)
    try:
        loaded = client.post("/adapters/ret-perturbed/load")
    finally:
        hook.remove()
    assert loaded.status_code == 409, loaded.text
    assert "text_itc" in loaded.json()["detail"] or "itm" in loaded.json()["detail"]


def test_an_fp32_record_passes_in_bfloat16(tmp_path):
    refs = publish_test_sets(tmp_path)
    prober = tiny_prober()  # the backbone's record too, made in float32 before the bfloat16 server starts
    write_record(tmp_path / "golden", prober.record(), f"backbone-{backbone_fingerprint(prober.backbone)}.json")
    with running_app(tmp_path, backbone="blip-tiny", dtype="bfloat16") as service, service.client() as c:
        for name in refs:
            loaded = c.post(f"/adapters/{name}/load")
            assert loaded.status_code == 200, loaded.text
        golden = c.get("/readyz", params={"verbose": "true"}).json()["details"]["golden"]
    assert golden["backbone"]["result"] == "pass", golden["backbone"]
    assert {refs[n]: golden["sets"][refs[n]]["result"] for n in refs} == {refs[n]: "pass" for n in refs}
    assert server_objects(service).engine.backbone.dtype == torch.bfloat16


def test_the_shipped_demo_records_pass_in_bfloat16(tmp_path):
    with running_app(tmp_path, dtype="bfloat16") as service, service.client() as c:
        for name in ("demo-retrieval", "demo-vqa", "demo-videoqa"):
            assert c.post(f"/adapters/{name}/load").status_code == 200
        golden = c.get("/readyz", params={"verbose": "true"}).json()["details"]["golden"]
    assert golden["backbone"]["result"] == "pass"
    assert sorted(o["result"] for o in golden["sets"].values()) == ["pass"] * 3


def test_a_backbone_that_fails_its_record_keeps_the_server_unready(tmp_path):
    prober = tiny_prober()
    name = f"backbone-{backbone_fingerprint(prober.backbone)}.json"
    write_record(tmp_path / "golden", prober.record(), name)
    tamper(tmp_path / "golden", "image_states", by=0.3, file=name)
    with running_app(tmp_path, backbone="blip-tiny") as service, service.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["golden"] == "mismatch", ready.json()
        assert any("golden record" in w for w in ready.json()["warnings"])
        answer = c.post("/vqa", json={"image": PNG, "question": "what colour?"})
        assert answer.status_code == 503 and "image_states[0]" in answer.json()["detail"], answer.text
        assert golden_count(c, "backbone", "mismatch") == 1


def upload(folder: Path, golden: bytes | None = None) -> dict[str, tuple[str, bytes]]:
    files = {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}
    if golden is not None:
        files["golden"] = (GOLDEN_FILE, golden)
    return files


_NAMES = itertools.count()


@pytest.fixture
def new_set(tmp_path):
    """An unpublished set folder 'pub-<n>' for blip-tiny (n unique in the module's app), and its golden record made
    in float32."""

    def make() -> tuple[str, Path, bytes]:
        n = next(_NAMES)
        prober = tiny_prober()
        module = random_adapter(prober.backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4),
                                seed=50 + n)
        folder = tmp_path / f"pub-{n}"
        save_adapter_set(module, folder, name=f"pub-{n}", backbone=BackboneInfo.of(prober.backbone),
                         answer_list=ANSWERS)
        meta = read_adapter_meta(folder)
        return f"pub-{n}", folder, prober.record(module, ref=meta.ref, answer_list=ANSWERS).to_json()

    return make


def test_publishing_keeps_an_uploaded_record_it_reproduces(app, client, new_set):
    name, folder, record = new_set()
    published = client.post(f"/adapters/{name}/publish", files=upload(folder, record))
    assert published.status_code == 201, published.text
    installed = server_objects(app).registry.resolve(published.json()["ref"]).path
    assert (installed / GOLDEN_FILE).read_bytes() == record
    assert client.post(f"/adapters/{published.json()['ref']}/load").status_code == 200


def test_publishing_refuses_an_uploaded_record_it_does_not_reproduce(app, client, new_set):
    name, folder, record = new_set()
    doc = json.loads(record)
    doc["probes"]["answer_scores"]["values"][1][2] -= 3.0
    refused = client.post(f"/adapters/{name}/publish", files=upload(folder, json.dumps(doc).encode()))
    assert refused.status_code == 409 and "answer_scores[1]" in refused.json()["detail"], refused.text
    assert str(folder) not in refused.json()["detail"]
    assert client.get(f"/adapters/{name}").status_code == 404  # nothing was published


@pytest.mark.parametrize("body", [b"{", b"[" * 50_000, json.dumps({"format": 1, "probes": []}).encode(),
                                  b"x" * 70_000])
def test_publishing_refuses_a_malformed_record_with_400(client, new_set, body):
    name, folder, _ = new_set()
    refused = client.post(f"/adapters/{name}/publish", files=upload(folder, body))
    assert refused.status_code == 400 and "golden" in refused.json()["detail"], refused.text


def test_publishing_without_a_record_records_one_here(app, client, new_set):
    name, folder, _ = new_set()
    published = client.post(f"/adapters/{name}/publish", files=upload(folder))
    assert published.status_code == 201, published.text
    record = json.loads((server_objects(app).registry.resolve(published.json()["ref"]).path / GOLDEN_FILE)
                        .read_text())
    assert (record["subject"], record["ref"], record["device"], record["dtype"]) == (
        "set", published.json()["ref"], "cpu", "float32")
    assert set(record["probes"]) == {"answer_scores", "greedy"}


# -- the live self-check -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("self-check")
    publish_test_sets(root)
    srv = start_in_process(root, max_wait_ms=150, self_check_rate=1.0)
    yield srv
    srv.stop()


def self_checks(srv, result: str) -> float:
    registry = srv.parts.metrics.registry
    return sum(registry.get_sample_value("uniadapter_self_checks_total", {"stage": s, "result": result}) or 0.0
               for s in ("vision", "answer"))


def mixed_vqa(srv) -> list[httpx.Response]:
    """Two /vqa requests on different sets, run as one vision batch and one answer batch."""
    requests = [{"image": PNG, "question": "what colour is it?", "adapter": a} for a in ("vqa-a", "vqa-b")]
    batcher = srv.batcher
    with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        with batcher.hold("answer"):
            with batcher.hold("vision"):
                futures = [pool.submit(client.post, "/vqa", json=r) for r in requests]
                until(lambda: batcher.queued("vision") == 2, "both vision jobs", 30, every=0.005)
            until(lambda: batcher.queued("answer") == 2, "both answer jobs", 30, every=0.005)
        return [f.result() for f in futures]


def test_the_self_check_passes_a_correct_mixed_batch(checked):
    before = self_checks(checked, "pass"), self_checks(checked, "mismatch")
    assert [r.status_code for r in mixed_vqa(checked)] == [200, 200]
    until(lambda: self_checks(checked, "pass") >= before[0] + 2, "a self-check of both stages", 30)
    assert self_checks(checked, "mismatch") == before[1]


def test_the_self_check_catches_rows_routed_to_the_wrong_set(checked, monkeypatch, caplog):
    real = Routing.per_sample.__func__  # type: ignore[attr-defined]

    def rotated(cls, adapters, device=None):  # every row of a mixed batch gets the next row's set
        adapters = list(adapters)
        return real(cls, adapters[1:] + adapters[:1], device)

    monkeypatch.setattr(Routing, "per_sample", classmethod(rotated))
    before = self_checks(checked, "mismatch")
    with caplog.at_level(logging.ERROR, logger="uniadapter_serve.service.batcher"):
        assert [r.status_code for r in mixed_vqa(checked)] == [200, 200]  # wrong, and nothing else would notice
        until(lambda: self_checks(checked, "mismatch") >= before + 2, "both stages' self-checks to fail", 30)
    logged = [r.getMessage() for r in caplog.records if "self-check mismatch" in r.getMessage()]
    assert logged and all("vqa-a@" in m and "vqa-b@" in m for m in logged), logged
