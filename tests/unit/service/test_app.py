"""The minimal app: health, readiness and the adapter listing, in-process."""

from __future__ import annotations

from fastapi.testclient import TestClient

from uniadapter_serve.adapters.format import BackboneInfo, save_adapter_set
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.service.app import create_app
from uniadapter_serve.service.settings import Settings


def test_health_ready_and_adapter_listing(tmp_path):
    backbone = load_backbone("blip-tiny")
    module = random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=4), seed=1)
    version = save_adapter_set(module, tmp_path / "vqa" / "v1", name="vqa", backbone=BackboneInfo.of(backbone))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{")
    settings = Settings(backbone="blip-tiny", adapters_root=tmp_path, device="cpu")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["backbone"]["fingerprints"] == backbone.fingerprints
        listing = client.get("/adapters").json()
    good = [r for r in listing if "error" not in r]
    bad = [r for r in listing if "error" in r]
    assert [r["ref"] for r in good] == [f"vqa@{version}"] and good[0]["compatible"] is True
    assert len(bad) == 1 and "not valid JSON" in bad[0]["error"]


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("UNIADAPTER_BACKBONE", "blip-tiny")
    monkeypatch.setenv("UNIADAPTER_PORT", "9123")
    s = Settings()
    assert s.backbone == "blip-tiny" and s.port == 9123
