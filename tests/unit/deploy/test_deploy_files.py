"""Deployment files checked without a Docker engine: compose structure, env names, Dockerfile layering."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
from pathlib import Path

import pytest
import yaml

from uniadapter_serve.service.settings import Settings

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_healthchecks_and_volumes(compose):
    services = compose["services"]
    assert set(services) == {"api", "redis", "postgres"}
    api, redis, postgres = services["api"], services["redis"], services["postgres"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    for service in (api, redis, postgres):
        assert service["healthcheck"]["test"][0] == "CMD"
    # PostgreSQL is optional: only in its profile, and the API starts without it
    assert postgres["profiles"] == ["postgres"] and api["depends_on"]["postgres"]["required"] is False
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert any(v.startswith("pgdata:") for v in postgres["volumes"]) and "pgdata" in compose["volumes"]
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert (ROOT / api["build"]["dockerfile"]).is_file()
    mounts = {v.split(":")[0]: v.split(":")[1] for v in api["volumes"]}
    assert set(mounts) <= set(compose["volumes"])  # every named volume is declared
    assert mounts["adapters"] == api["environment"]["UNIADAPTER_ADAPTERS_ROOT"]
    assert mounts["media"] == api["environment"]["UNIADAPTER_MEDIA_ROOT"]
    assert api["environment"]["UNIADAPTER_REDIS_URL"].startswith("redis://redis:")
    # --scale api=N needs a host port range, not one fixed port
    assert re.search(r"\d+-\d+}?:8000$", api["ports"][0])


def test_compose_env_names_are_settings(compose):
    fields = {f"UNIADAPTER_{name.upper()}" for name in Settings.model_fields}
    for service in compose["services"].values():
        for name in service.get("environment", {}):
            if name.startswith("UNIADAPTER_"):
                assert name in fields, name
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())["services"]["api"]
    assert set(gpu["environment"]) <= fields
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert (ROOT / gpu["build"]["dockerfile"]).is_file()


def test_env_example_is_generated_from_settings():
    spec = importlib.util.spec_from_file_location("env_example", ROOT / "scripts" / "env_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / ".env.example").read_text() == module.render(), "run: python scripts/env_example.py"


def test_env_example_lists_every_setting_with_its_default():
    entries = dict(re.findall(r"^# (UNIADAPTER_[A-Z0-9_]+)=(.*)$", (ROOT / ".env.example").read_text(), re.M))
    fields = {f"UNIADAPTER_{name.upper()}": field for name, field in Settings.model_fields.items()}
    assert set(entries) == set(fields)
    for name, field in fields.items():
        assert entries[name] == ("" if field.default is None else str(field.default)), name


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.gpu"])
def test_dockerfile_layers_and_runtime(dockerfile):
    text = (ROOT / dockerfile).read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    torch_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and "TORCH_SPEC" in ln)
    code_at = next(i for i, ln in enumerate(lines) if ln.startswith("COPY model"))
    deps_at = next(i for i, ln in enumerate(lines) if ln.startswith("COPY pyproject.toml"))
    assert torch_at < deps_at < code_at  # code changes never reinstall torch or the dependencies
    for folder in ("src", "model", "adapters", "service"):
        assert any(ln.startswith(f"COPY {folder} ") for ln in lines), folder
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "HEALTHCHECK" in text and "/readyz" in text
    extra = "gpu" if dockerfile.endswith(".gpu") else "cpu"
    assert f"ARG EXTRAS={extra}" in text and '".[$EXTRAS]"' in text
    entrypoint = ROOT / "docker" / "entrypoint.sh"
    assert entrypoint.is_file() and os.access(entrypoint, os.X_OK)


def test_faiss_extras_never_mix():
    import tomllib
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    gpu = {r.name: r for r in map(Requirement, extras["gpu"])}
    assert not any(name.startswith("faiss") and name != "faiss-gpu" for name in gpu)  # not faiss-cpu, faiss-gpu-cu12
    # Meta's own wheel (sm_90 kernels): 1.15 or newer, never the PyPI name's old unofficial 1.7.x
    assert "faiss-gpu" in gpu and "1.15" in gpu["faiss-gpu"].specifier and "1.7.2" not in gpu["faiss-gpu"].specifier
    assert "1.14.3" not in gpu["faiss-gpu"].specifier
    assert any("faiss-cpu" in d for d in extras["cpu"])
    assert not any("faiss-gpu" in d for name in ("cpu", "dev") for d in extras[name])


def test_gpu_image_installs_the_gpu_extra_on_cuda_12_6_or_newer():
    """faiss-gpu needs the CUDA 12 runtime >= 12.6: the base image and torch's build must be CUDA 12, >= 12.6."""
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    assert re.search(r"^ARG EXTRAS=gpu\b", code, re.M)
    installs = [ln for ln in code.splitlines() if "pip install" in ln and '".[$EXTRAS]"' in ln]
    assert len(installs) == 1
    assert "faiss" not in code  # FAISS comes from the extra alone, never a second faiss package beside it
    cuda = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-", code, re.M)
    assert cuda is not None and int(cuda[1]) == 12 and int(cuda[2]) >= 6
    torch_cuda = re.search(r'^ARG TORCH_INDEX_URL="\S+/whl/cu(\d+)"', code, re.M)
    assert torch_cuda is not None and 126 <= int(torch_cuda[1]) < 130


def test_package_data_carries_the_shipped_demo():
    """The images install the package (no source tree at run time): every shipped demo file must match a
    package-data pattern, or `serve` in a container would fall back to the random model."""
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    patterns = re.findall(r'"([^"]+)"', re.search(r'^"\*" = \[(.*?)\]', section, re.M).group(1))
    shipped = [p for folder in ("backbone", "adapters") for p in (ROOT / "model" / "demo" / folder).rglob("*")
               if p.is_file()]
    assert len(shipped) >= 8
    for path in shipped:
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns), path


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.gpu"])
def test_volume_mount_points_belong_to_the_app_user(compose, dockerfile):
    """A named volume mounted where the image has no directory is created root-owned, and the non-root
    service could not write adapter sets, collections or media into it."""
    text = (ROOT / dockerfile).read_text()
    made = set(re.search(r"mkdir -p ((?:/data\S*\s*)+)&& chown -R app /data", text).group(1).split())
    mounts = {v.split(":")[1] for v in compose["services"]["api"]["volumes"]}
    assert mounts <= made


def _serve_configs() -> list[tuple[str, dict]]:
    plain = yaml.safe_load((ROOT / "docker" / "ray" / "serve-config.yaml").read_text())
    service = yaml.safe_load((ROOT / "docker" / "ray" / "rayservice.yaml").read_text())
    return [("serve-config.yaml", plain), ("rayservice.yaml", yaml.safe_load(service["spec"]["serveConfigV2"]))]


@pytest.mark.parametrize(("name", "config"), _serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_ray_serve_configs_name_the_builder_and_valid_settings(name, config):
    import importlib

    app = config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    settings = Settings(**app["args"])  # every arg is a setting with a valid value
    assert settings.ray_model_gpus == 1 and settings.ray_max_replicas and settings.device == "cuda"


def test_rayservice_scales_gpu_workers_and_mounts_the_shared_volume():
    service = yaml.safe_load((ROOT / "docker" / "ray" / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"]
    worker = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    container = worker["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"/shared", "/data"} <= {m["mountPath"] for m in container["volumeMounts"]}
    args = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["adapters_root"].startswith("/shared") and args["media_root"].startswith("/shared")
