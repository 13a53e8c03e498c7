from __future__ import annotations

import pytest

from uniadapter_serve.adapters.format import BackboneInfo
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig


@pytest.fixture
def registry(backbone, tmp_path):
    """An adapters root with sets a, b, c (retrieval, same size) and d (VQA), one version each."""
    reg = AdapterRegistry(tmp_path / "adapters")
    info = BackboneInfo.of(backbone)
    for i, name in enumerate("abc"):
        module = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4), seed=60 + i)
        reg.publish(module, name, info)
    reg.publish(random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), seed=70), "d", info,
                answer_list=["red", "blue"])
    return reg
