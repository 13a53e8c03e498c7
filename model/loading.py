"""`load_backbone(source)`: the one door through which a backbone is built.

Sources: a `BlipConfig` or the name of a bundled config (random init, for tests and
benchmarks); a transformers-format folder (`config.json` + `model.safetensors` or a sharded
index); a hub id when the machine has network. Only safetensors are read here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import BlipConfig

from uniadapter_serve.errors import CheckpointError, ConfigError
from uniadapter_serve.model.backbone import COMPONENTS, BlipBackbone, text_config

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
DEMO_DIR = Path(__file__).parent / "demo" / "backbone"
"""Where the trained demo backbone ships; until it exists, 'demo' is a seeded random model."""
HEAD_PREFIXES = ("vision_proj.", "text_proj.", "itm_head.")
IGNORED_PREFIXES = ("text_encoder.pooler.",)
# Keys that transformers writes but that carry no state of their own here.
TIED_DECODER_KEYS = {
    "text_decoder.cls.predictions.decoder.weight": "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.bias": "text_decoder.cls.predictions.bias",
}


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> BlipConfig:
    """A bundled config by name (`blip-base`, `blip-tiny`) or a config.json path."""
    path = Path(name_or_path)
    if not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ConfigError(f"no config {name_or_path!r}; bundled configs: {bundled_configs()}")
    try:
        data = json.loads(path.read_text())
        return BlipConfig.from_dict(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid BLIP config {path}: {e}") from e


def component_of(key: str) -> str | None:
    if key.startswith(HEAD_PREFIXES):
        return "heads"
    head = key.split(".", 1)[0]
    return head if head in COMPONENTS else None


def fingerprint(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """sha256 per component over sorted names, shapes and fp32 values (first 16 hex digits).

    Computed on the weights as loaded, before any dtype cast, so an fp16 replica of the
    same checkpoint has the same fingerprint as the fp32 one.
    """
    hashes: dict[str, hashlib._Hash] = {}
    for key in sorted(state):
        comp = component_of(key)
        if comp is None:
            continue
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h = hashes.setdefault(comp, hashlib.sha256())
        h.update(f"{key}:{tuple(t.shape)};".encode())
        h.update(t.numpy().data)
    return {c: h.hexdigest()[:16] for c, h in hashes.items()}


@torch.no_grad()
def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """Random init for configs built from scratch: normal(0, std) weights, zero biases,
    unit LayerNorms. Position/class embeddings get std 0.02 too (transformers' BLIP default of
    1e-10 makes position unlearnable for small models trained from scratch)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for name, p in module.named_parameters():
        if name.endswith(("class_embedding", "position_embedding")):
            nn.init.trunc_normal_(p, 0.0, std)
        elif name.endswith("cls.predictions.bias"):
            nn.init.zeros_(p)


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load_file(str(folder / shard)))
            return state
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read weights in {folder}: {e}") from e
    raise CheckpointError(
        f"{folder} has no model.safetensors (or sharded index); only safetensors are loaded at serve "
        "time: convert .pth/.bin files offline with `uniadapter backbone convert`"
    )


def backbone_from_state_dict(config: BlipConfig, state: Mapping[str, torch.Tensor]) -> BlipBackbone:
    """Build a backbone holding exactly the components present in `state` (transformers names)."""
    state = dict(state)
    for alias, target in TIED_DECODER_KEYS.items():
        tensor = state.pop(alias, None)
        if tensor is not None and target in state and not torch.equal(tensor, state[target]):
            raise CheckpointError(f"{alias} differs from {target}; untied decoder weights are not supported")
    # position_ids: a non-persistent buffer in newer transformers; pooler: unused by BLIP's tasks.
    state = {k: v for k, v in state.items()
             if not k.endswith("position_ids") and not k.startswith(IGNORED_PREFIXES)}
    unknown = sorted(k for k in state if component_of(k) is None)
    if unknown:
        raise CheckpointError(f"{len(unknown)} unexpected keys, e.g. {unknown[:5]}")
    present = {c for c in map(component_of, state) if c is not None}
    heads = [p for p in HEAD_PREFIXES if any(k.startswith(p) for k in state)]
    if heads and len(heads) != len(HEAD_PREFIXES):
        raise CheckpointError(f"retrieval heads are partial: found {heads}, need {list(HEAD_PREFIXES)}")
    missing_parts = {"vision_model", "text_encoder"} - present
    if missing_parts:
        raise CheckpointError(f"checkpoint lacks {sorted(missing_parts)}; found components {sorted(present)}")
    with torch.device("meta"):
        model = BlipBackbone(config, components=[c for c in COMPONENTS if c in present])
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:5]}")
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{len(missing)} missing keys, e.g. {missing[:5]}")
    for key, ref in expected.items():
        if tuple(ref.shape) != tuple(state[key].shape):
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(state[key].shape)} != config shape {tuple(ref.shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    positions = text_config(config).max_position_embeddings
    model.text_encoder.embeddings.position_ids = _positions(positions)
    if model.text_decoder is not None:
        model.text_decoder.bert.embeddings.position_ids = _positions(positions)
    model.fingerprints = fingerprint(state)
    return model


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n)[None]


def random_backbone(config: BlipConfig | str, seed: int = 0) -> BlipBackbone:
    """A randomly initialised backbone (tests, benchmarks, the placeholder demo)."""
    cfg = load_config(config) if isinstance(config, str) else config
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BlipBackbone(cfg)
        init_weights(model)
    finally:
        torch.random.set_rng_state(gen_state)
    model.fingerprints = fingerprint(model.state_dict())
    return model


def local_folder(source: str | Path) -> Path | None:
    """The folder a backbone source reads its files from (the shipped one for 'demo'), if local."""
    if str(source) == "demo":
        return DEMO_DIR if (DEMO_DIR / "config.json").is_file() else None
    folder = Path(source)
    return folder if folder.is_dir() else None


def load_backbone(source: str | Path | BlipConfig, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> BlipBackbone:
    """Build the frozen backbone from `source` and move it to `device`/`dtype`.

    `source`: a BlipConfig or bundled config name (random, seed 0), a local transformers-format
    folder, or a hub id (`org/name`, only where the machine has network).
    """
    if isinstance(source, BlipConfig):
        model = random_backbone(source)
    elif str(source) == "demo":
        if (DEMO_DIR / "config.json").is_file():
            model = _from_folder(DEMO_DIR)
        else:
            log.warning("no trained demo backbone in %s; serving a seeded random 'blip-demo' model", DEMO_DIR)
            model = random_backbone("blip-demo")
    else:
        folder = Path(source)
        if folder.is_dir():
            model = _from_folder(folder)
        elif str(source) in bundled_configs():
            model = random_backbone(str(source))
        elif "/" in str(source) and not folder.exists() and not str(source).startswith((".", "/")):
            model = _from_folder(_download(str(source)))
        else:
            raise CheckpointError(
                f"backbone source {source!r} is not a folder, a bundled config ({bundled_configs()}) or a hub id"
            )
    model.requires_grad_(False)
    model.eval()
    return model.to(device=device, dtype=dtype)


def source_config(source: str | Path) -> BlipConfig:
    """The config of a backbone source, without reading its weights (a process that routes requests but
    runs no model: image size, embedding size)."""
    if str(source) == "demo":
        return load_config(DEMO_DIR / "config.json" if (DEMO_DIR / "config.json").is_file() else "blip-demo")
    folder = Path(source)
    if folder.is_dir():
        return load_config(folder / "config.json")
    if str(source) in bundled_configs():
        return load_config(str(source))
    return load_config(_download(str(source)) / "config.json")


def _from_folder(folder: Path) -> BlipBackbone:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    config = load_config(config_file)
    return backbone_from_state_dict(config, read_safetensors(folder))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.json", "*.txt"])
    except Exception as e:  # network, auth, missing repo: all mean "cannot get it"
        raise CheckpointError(f"cannot fetch {repo_id!r} from the hub: {e}") from e
    return Path(path)
