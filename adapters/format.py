"""The adapter-set format on disk, and `load_adapter_set(path)`: the one door for loading one.

A set is a folder:
  adapter_config.json        task, bottleneck, layers, scale, options, backbone fingerprint, created
  adapter_model.safetensors  every tensor the task trained (answer list in its metadata)
Its version is the first 12 hex digits of the sha256 of the weights file.
Every check (JSON, safetensors header, fingerprint, each tensor's shape) runs before a
single tensor is read into a module; only safetensors are ever read.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from uniadapter_serve.errors import AdapterFormatError, AdapterIncompatibleError, ConfigError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.uniadapter import AdapterSetModule, BackboneDims, UniAdapterConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
VERSION_DIGITS = 12
METADATA_KEY = "uniadapter"

TASK_COMPONENTS: dict[str, tuple[str, ...]] = {
    "retrieval": ("vision_model", "text_encoder", "heads"),
    "vqa": ("vision_model", "text_encoder", "text_decoder"),
    "videoqa": ("vision_model", "text_encoder", "text_decoder"),
}


@dataclass(frozen=True)
class BackboneInfo:
    """What a set records about the backbone it was trained on."""

    dims: BackboneDims
    fingerprints: dict[str, str]
    parameters: dict[str, int]

    @classmethod
    def of(cls, backbone: BlipBackbone) -> BackboneInfo:
        return cls(backbone.dims, dict(backbone.fingerprints), backbone.component_parameters())

    def to_dict(self) -> dict[str, Any]:
        return {"dims": dataclasses.asdict(self.dims), "fingerprints": self.fingerprints,
                "parameters": self.parameters}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneInfo:
        return cls(BackboneDims(**data["dims"]), dict(data["fingerprints"]), dict(data["parameters"]))


@dataclass(frozen=True)
class AdapterSetMeta:
    """The parsed `adapter_config.json` plus the weights file's header and hash."""

    path: Path
    name: str
    config: UniAdapterConfig
    backbone: BackboneInfo
    created: str
    version: str
    shapes: dict[str, tuple[int, ...]]
    answer_list: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    file_key: tuple[int, int, int, int] | None = None
    """(size, mtime_ns) of the weights and config files when they were read and hashed"""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def num_parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def required_components(self) -> list[str]:
        """Backbone components whose weights this set depends on (and so must fingerprint-match)."""
        comps = [c for c in TASK_COMPONENTS[self.config.task] if c != "heads"]
        if self.config.task == "retrieval" and len(self.config.heads) < 3:
            comps.append("heads")
        return comps

    def backbone_parameters(self) -> int:
        """Parameters of the backbone components this task runs through."""
        return sum(self.backbone.parameters.get(c, 0) for c in TASK_COMPONENTS[self.config.task])

    def percent_of_backbone(self) -> float:
        base = self.backbone_parameters()
        return 100.0 * self.num_parameters / base if base else float("nan")


@dataclass
class LoadedAdapterSet:
    meta: AdapterSetMeta
    module: AdapterSetModule

    @property
    def nbytes(self) -> int:
        return self.module.num_bytes()


# -- writing ----------------------------------------------------------------------------------


def save_adapter_set(module: AdapterSetModule, folder: str | Path, *, name: str, backbone: BackboneInfo,
                     answer_list: list[str] | None = None, extra: dict[str, Any] | None = None) -> str:
    """Write a set folder atomically (weights first, then config); returns its version."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    # One metadata key: safetensors writes its metadata map in hash order, and the version
    # (a hash of these bytes) must not change when the same weights are saved again.
    info: dict[str, Any] = {"task": module.config.task}
    if answer_list is not None:
        info["answer_list"] = list(answer_list)
    blob = save_safetensors_bytes(tensors, metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
    version = hashlib.sha256(blob).hexdigest()[:VERSION_DIGITS]
    config = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "adapter": module.config.to_dict(),
        "backbone": backbone.to_dict(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
        "extra": extra or {},
    }
    atomic_write(folder / WEIGHTS_FILE, blob)
    atomic_write(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return version


# -- reading ----------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise AdapterFormatError(f"{folder} is not an adapter-set folder")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFormatError(f"{folder} has no {CONFIG_FILE}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested past any reader
        raise AdapterFormatError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{path}: unsupported format_version {data.get('format_version')!r}"
                                 if isinstance(data, dict) else f"{path}: expected a JSON object")
    return data


def _header(blob: bytes, path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Parse the safetensors header only: tensor shapes and metadata."""
    if len(blob) < 8:
        raise AdapterFormatError(f"{path} is truncated ({len(blob)} bytes)")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise AdapterFormatError(f"{path} is truncated or corrupt (header of {n} bytes, file of {len(blob)})")
    try:
        header = json.loads(blob[8:8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # nested past any reader
        raise AdapterFormatError(f"{path} has a corrupt header: {e}") from e
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path} has a corrupt header")
    metadata = header.pop("__metadata__", None) or {}
    try:
        shapes = {k: tuple(int(s) for s in v["shape"]) for k, v in header.items()}
    except (TypeError, KeyError, ValueError) as e:
        raise AdapterFormatError(f"{path} has a corrupt header: {e}") from e
    return shapes, metadata


def file_key(folder: Path) -> tuple[int, int, int, int] | None:
    """Identity of a set's files on disk, to skip re-hashing files that did not change."""
    try:
        w, c = (folder / WEIGHTS_FILE).stat(), (folder / CONFIG_FILE).stat()
    except OSError:
        return None
    return (w.st_size, w.st_mtime_ns, c.st_size, c.st_mtime_ns)


def _read(folder: str | Path) -> tuple[AdapterSetMeta, bytes]:
    folder = Path(folder)
    key = file_key(folder)
    data = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFormatError(f"{folder} has no {WEIGHTS_FILE}")
    blob = weights.read_bytes()
    shapes, metadata = _header(blob, weights)
    try:
        config = UniAdapterConfig.from_dict(data["adapter"])
        backbone = BackboneInfo.from_dict(data["backbone"])
        name = str(data["name"])
        info = json.loads(metadata.get(METADATA_KEY, "{}"))
        answers = info.get("answer_list")
        if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise ValueError("answer_list must be a list of strings")
        extra = dict(data.get("extra") or {})
        rank_k = extra.get("rank_k")
        if rank_k is not None and (not isinstance(rank_k, int) or isinstance(rank_k, bool) or rank_k < 1):
            raise ValueError(f"extra.rank_k must be a positive integer, got {rank_k!r}")
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError, RecursionError) as e:
        raise AdapterFormatError(f"{folder}: invalid field: {e}") from e
    meta = AdapterSetMeta(
        path=folder, name=name, config=config, backbone=backbone, created=str(data.get("created", "")),
        version=hashlib.sha256(blob).hexdigest()[:VERSION_DIGITS], shapes=shapes, answer_list=answers,
        extra=extra, file_key=key,
    )
    return meta, blob


def read_adapter_meta(folder: str | Path) -> AdapterSetMeta:
    """Parse and hash a set folder without building any module."""
    return _read(folder)[0]


def check_compatible(meta: AdapterSetMeta, backbone: BlipBackbone) -> None:
    """Raise AdapterIncompatibleError naming the first mismatch; touches nothing."""
    for comp in meta.required_components():
        have = backbone.fingerprints.get(comp)
        want = meta.backbone.fingerprints.get(comp)
        if have is None:
            raise AdapterIncompatibleError(f"{meta.ref} needs backbone component {comp!r}, which is not loaded")
        if want != have:
            raise AdapterIncompatibleError(
                f"{meta.ref} was trained on a backbone whose {comp} fingerprint is {want}; "
                f"the loaded backbone's is {have}"
            )
    if meta.config.task in ("vqa", "videoqa") and backbone.text_decoder is None:
        raise AdapterIncompatibleError(f"{meta.ref} is a {meta.config.task} set but the backbone has no decoder")
    expected = expected_shapes(meta.config, backbone.dims)
    for key, shape in expected.items():
        if key not in meta.shapes:
            raise AdapterIncompatibleError(f"{meta.ref}: tensor {key} is missing (expected shape {shape})")
        if meta.shapes[key] != shape:
            raise AdapterIncompatibleError(
                f"{meta.ref}: tensor {key} has shape {meta.shapes[key]}, its config and the backbone need {shape}"
            )
    extra = sorted(set(meta.shapes) - set(expected))
    if extra:
        raise AdapterIncompatibleError(f"{meta.ref}: unexpected tensors {extra[:5]}")


@dataclass(frozen=True)
class SetLimits:
    """What a set's own fields may ask of a server (its MAX_RANK_K and MAX_ANSWER_LIST settings): a set may
    ask for less, never more. The one place these caps are applied."""

    max_rank_k: int
    """most candidates a set's `extra.rank_k` may have scored in full (each costs a decoder row per token)"""
    max_answers: int
    """most answers in a set's own answer list (each is tokenised and kept while the set is in use)"""

    def check(self, meta: AdapterSetMeta) -> None:
        """AdapterIncompatibleError naming the first field over its limit: a set to be published must fit."""
        rank_k = meta.extra.get("rank_k")
        if rank_k is not None and rank_k > self.max_rank_k:
            raise AdapterIncompatibleError(f"{meta.ref}: extra.rank_k is {rank_k:,}, over this server's limit of "
                                           f"{self.max_rank_k:,} (MAX_RANK_K)")
        self.check_answers(meta)

    def check_answers(self, meta: AdapterSetMeta) -> None:
        """AdapterIncompatibleError if the set's answer list is over the limit. A set already on disk with one
        is refused, not cut: which answers exist is what the set was trained to choose from."""
        if meta.answer_list is not None and len(meta.answer_list) > self.max_answers:
            raise AdapterIncompatibleError(f"{meta.ref}: its answer list has {len(meta.answer_list):,} answers, "
                                           f"over this server's limit of {self.max_answers:,} (MAX_ANSWER_LIST)")

    def rank_k(self, meta: AdapterSetMeta | None, default: int, *, top_k: int = 1, answers: int | None = None) -> int:
        """Candidates scored in full in rank mode, decided here alone: the set's `extra.rank_k` (else `default`),
        at most `max_rank_k`, at least the `top_k` answers asked for, at most the list's `answers`. A set
        already on disk that asks for more is clamped, not refused: a smaller k only prunes harder by the first
        token, over the same answers and the same scores."""
        own = meta.extra.get("rank_k") if meta is not None else None
        k = max(top_k, min(int(own) if own is not None else default, self.max_rank_k))
        return k if answers is None else min(k, answers)


def expected_shapes(config: UniAdapterConfig, dims: BackboneDims) -> dict[str, tuple[int, ...]]:
    return dict(_expected_shapes(json.dumps(config.to_dict(), sort_keys=True), dims))


@functools.lru_cache(maxsize=256)
def _expected_shapes(config_json: str, dims: BackboneDims) -> tuple[tuple[str, tuple[int, ...]], ...]:
    with torch.device("meta"):
        module = AdapterSetModule(UniAdapterConfig.from_dict(json.loads(config_json)), dims, init=False)
    return tuple(module.expected_shapes().items())


def load_adapter_set(folder: str | Path, backbone: BlipBackbone, *, device: torch.device | str | None = None,
                     dtype: torch.dtype | None = None, meta: AdapterSetMeta | None = None) -> LoadedAdapterSet:
    """Validate a set against `backbone`, then build its module on the backbone's device/dtype.

    With `meta` from a registry scan whose files have not changed since (same sizes and mtimes), the
    weights are not read and hashed a second time: they are memory-mapped straight into the module.
    """
    path = Path(folder)
    if meta is not None and meta.file_key is not None and meta.file_key == file_key(path):
        check_compatible(meta, backbone)
        try:
            tensors = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterFormatError(f"{path / WEIGHTS_FILE} is corrupt: {e}") from e
    else:
        scanned = meta
        meta, blob = _read(path)
        if scanned is not None and scanned.version != meta.version:
            raise AdapterFormatError(
                f"{path} changed on disk since it was scanned as {scanned.ref} (its version is now {meta.version}); "
                "publish new versions into new folders"
            )
        check_compatible(meta, backbone)
        try:
            tensors = load_safetensors_bytes(blob)
        except (SafetensorError, ValueError) as e:
            raise AdapterFormatError(f"{meta.path / WEIGHTS_FILE} is corrupt: {e}") from e
    with torch.device("meta"):
        module = AdapterSetModule(meta.config, backbone.dims, init=False)
    module.load_state_dict(tensors, strict=True, assign=True)
    module.requires_grad_(False)
    module.eval()
    module.to(device=device or backbone.device, dtype=dtype or backbone.dtype)
    return LoadedAdapterSet(meta=meta, module=module)


def new_adapter_set(backbone: BlipBackbone, config: UniAdapterConfig, *, seed: int | None = None) -> AdapterSetModule:
    """A freshly initialised set for `backbone` (zero up-projections: equals the bare backbone)."""
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = AdapterSetModule(config, backbone.dims)
    else:
        module = AdapterSetModule(config, backbone.dims)
    return module.to(device=backbone.device, dtype=backbone.dtype)
