from __future__ import annotations

import pytest
import torch
from transformers import BlipConfig

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.loading import fingerprint, load_config, random_backbone
from uniadapter_serve.model.testing import randomize_


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> BlipConfig:
    return load_config("blip-tiny")


@pytest.fixture
def backbone(tiny_config: BlipConfig) -> BlipBackbone:
    """A tiny backbone with every component and every weight random (seeded), frozen."""
    model = random_backbone(tiny_config, seed=1)
    randomize_(model, seed=2)
    model.fingerprints = fingerprint(model.state_dict())
    model.requires_grad_(False)
    return model.eval()
