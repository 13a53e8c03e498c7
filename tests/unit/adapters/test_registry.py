"""The adapters root: versions, newest-wins resolution, publishing, and folders that are not sets."""

from __future__ import annotations

import json
import shutil

import pytest

from uniadapter_serve.adapters.format import CONFIG_FILE, BackboneInfo, save_adapter_set
from uniadapter_serve.adapters.registry import AdapterRegistry, parse_ref
from uniadapter_serve.errors import AdapterNotFoundError, AdapterVersionNotFoundError, ConfigError
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig


def _module(backbone, seed):
    return random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8), seed=seed)


def test_publish_layout_and_newest_wins(registry, backbone):
    first = registry.resolve("a")
    assert first.path == registry.root / "a" / first.version
    second = registry.publish(_module(backbone, 99), "a", BackboneInfo.of(backbone))
    assert second.version != first.version
    assert registry.resolve("a").ref == second.ref
    assert registry.resolve(first.ref).ref == first.ref  # the old version stays addressable
    assert [m.version for m in registry.versions("a")] == [second.version, first.version]
    assert registry.names() == ["a", "b", "c", "d"]


def test_single_version_folder_directly_under_its_name(backbone, tmp_path):
    root = tmp_path / "root"
    version = save_adapter_set(_module(backbone, 1), root / "solo", name="solo", backbone=BackboneInfo.of(backbone))
    registry = AdapterRegistry(root)
    assert registry.resolve("solo").version == version


def test_unreadable_and_misnamed_folders_are_reported_not_fatal(registry, backbone):
    bad = registry.root / "broken" / "v1"
    bad.mkdir(parents=True)
    (bad / CONFIG_FILE).write_text("{")
    shutil.copytree(registry.resolve("b").path, registry.root / "renamed" / "x")
    (registry.root / ".a-staging").mkdir()
    registry.refresh()
    errors = registry.errors()
    assert any("not valid JSON" in e for e in errors.values())
    assert any("does not match its folder 'renamed'" in e for e in errors.values())
    assert "broken" not in registry.names() and "renamed" not in registry.names()
    assert registry.resolve("b")


def test_publish_folder(registry, backbone, tmp_path):
    src = tmp_path / "incoming"
    version = save_adapter_set(_module(backbone, 7), src, name="e", backbone=BackboneInfo.of(backbone))
    meta = registry.publish_folder(src)
    assert meta.ref == f"e@{version}" and (registry.root / "e" / version / CONFIG_FILE).is_file()
    with pytest.raises(ConfigError, match="named 'e'"):
        registry.publish_folder(src, name="f")


def test_new_folder_on_disk_is_found_on_resolve(registry, backbone):
    registry.refresh_on_miss_every_s = 0
    save_adapter_set(_module(backbone, 8), registry.root / "late" / "v1", name="late",
                     backbone=BackboneInfo.of(backbone))
    assert registry.resolve("late").name == "late"


def test_misses_rescan_the_disk_at_most_once_per_interval(registry, monkeypatch):
    scans = []
    real = registry.refresh
    monkeypatch.setattr(registry, "refresh", lambda: (scans.append(1), real())[1])
    registry.refresh_on_miss_every_s = registry.max_staleness_s = 60
    registry._last_refresh = 0.0
    for _ in range(20):
        with pytest.raises(AdapterNotFoundError):
            registry.resolve("nope")
    assert len(scans) == 1


def test_ambiguous_prefix_is_not_resolved(registry, backbone):
    registry.publish(_module(backbone, 10), "a", BackboneInfo.of(backbone))
    with pytest.raises(AdapterVersionNotFoundError):
        registry.resolve("a@" + "0" * 12)


@pytest.mark.parametrize("ref", ["", "a/b", "../x", ".hidden", "a" * 65, "a b"])
def test_invalid_names(ref):
    with pytest.raises(AdapterNotFoundError, match="invalid adapter name"):
        parse_ref(ref)


def test_config_name_is_what_counts(registry):
    meta = registry.resolve("c")
    config = json.loads((meta.path / CONFIG_FILE).read_text())
    assert config["name"] == "c"


def test_name_resolves_to_a_version_published_by_another_process(registry, backbone):
    other = AdapterRegistry(registry.root)  # a replica sharing the volume, no events
    other.refresh()
    first = other.resolve("a")
    newer = registry.publish(_module(backbone, 77), "a", BackboneInfo.of(backbone))
    assert other.resolve("a") == first  # within the staleness window: the cached view
    other.max_staleness_s = 0
    assert other.resolve("a").ref == newer.ref


def test_a_version_published_by_another_process_is_found_at_once(registry, backbone, monkeypatch):
    """A replica asked for the exact version its ingress just published finds it, however recently it scanned
    (the Ray app's model replicas answered 404 'has no version' for a second after a publish); a version that
    is not on disk still rescans only at the rate limit."""
    other = AdapterRegistry(registry.root)
    other.refresh_on_miss_every_s = other.max_staleness_s = 3600
    other.refresh()
    newer = registry.publish(_module(backbone, 78), "a", BackboneInfo.of(backbone))
    assert other.resolve(newer.ref).ref == newer.ref
    scans = []
    real = other.refresh
    monkeypatch.setattr(other, "refresh", lambda: (scans.append(1), real())[1])
    for _ in range(5):
        with pytest.raises(AdapterVersionNotFoundError):
            other.resolve("a@" + "f" * 12)
    assert scans == []


def test_newest_is_the_version_published_last_not_the_one_created_last(registry, backbone, tmp_path):
    folder = tmp_path / "claims-old"
    save_adapter_set(_module(backbone, 31), folder, name="a", backbone=BackboneInfo.of(backbone))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["created"] = "1999-12-31T23:59:59+00:00"  # a client cannot reorder versions by what it uploads
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    old = registry.resolve("a")
    late = registry.publish_folder(folder)
    assert registry.resolve("a").ref == late.ref
    assert registry.published(late) > registry.published(old) and late.created.startswith("1999")
    again = registry.publish_folder(old.path)  # published again: the newest once more (a rollback)
    assert again.ref == old.ref and registry.resolve("a").ref == old.ref
    assert [m.ref for m in registry.versions("a")] == [old.ref, late.ref]
    assert AdapterRegistry(registry.root).resolve("a").ref == old.ref  # the order is on disk, not in memory


def test_folders_never_published_here_are_ordered_by_created(backbone, tmp_path):
    root = tmp_path / "root"
    info = BackboneInfo.of(backbone)
    for seed, created in ((1, "2030-01-01T00:00:00+00:00"), (2, "2020-01-01T00:00:00+00:00")):
        folder = root / "hand" / f"v{seed}"
        save_adapter_set(_module(backbone, seed), folder, name="hand", backbone=info)
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["created"] = created
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    registry = AdapterRegistry(root)
    registry.refresh()
    assert registry.resolve("hand").path.name == "v1"
    assert registry.published(registry.resolve("hand")) == "2030-01-01T00:00:00+00:00"
