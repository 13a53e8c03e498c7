"""An independent oracle: one adapted ViT block, one text-only layer and one multimodal layer (with the
K/V deltas on cross-attention, in the encoder and in the causal answer decoder) computed from the
paper's equations in plain float64 torch (`support.oracle`), on the same weights as our modules."""

from __future__ import annotations

import pytest
import torch
from support import oracle

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.text import causal_mask, padding_mask
from uniadapter_serve.model.uniadapter import UniAdapterConfig

TOL = 1e-5
LAYER = 1  # not 0: the adapter of layer i must serve block / layer i
OUR_VIT = {"ln1": "layer_norm1", "qkv": "self_attn.qkv", "proj": "self_attn.projection", "ln2": "layer_norm2",
           "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
OUR_KV = {"k": "key_adapter", "v": "value_adapter"}


@pytest.fixture
def adapter(backbone):
    # std 0.3: every branch moves the outputs by > 1e-2, far above the tolerance
    return random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=16, kv_rank=4), seed=7, std=0.3)


def _weights(backbone, adapter):
    state, set_state = backbone.state_dict(), adapter.state_dict()
    return {
        "vit": oracle.by_role(state, f"vision_model.encoder.layers.{LAYER}.", OUR_VIT),
        "enc": oracle.by_role(state, f"text_encoder.encoder.layer.{LAYER}.", oracle.ORIGINAL_BERT),
        "dec": oracle.by_role(state, f"text_decoder.bert.encoder.layer.{LAYER}.", oracle.ORIGINAL_BERT),
        "adapter": oracle.by_role(set_state, f"adapters.{LAYER}.", oracle.ORIGINAL_ADAPTER),
        "enc_kv": oracle.kv_by_role(set_state, "text_encoder_kv.", OUR_KV),
        "dec_kv": oracle.kv_by_role(set_state, "text_decoder_kv.", OUR_KV),
    }


def _close(ours: torch.Tensor, reference: torch.Tensor, bare: torch.Tensor) -> None:
    assert (reference - bare).abs().max() > 1e-2  # the adapter matters at this tolerance
    err = (ours.double() - reference).abs().max().item()
    assert err <= TOL, f"max |ours - oracle| = {err:.2e}"


def _masks(B: int, L: int) -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.long)
    for i in range(B):
        mask[i, L - i:] = 0  # row i has i padded positions
    return mask


@torch.no_grad()
def test_vit_block(backbone, adapter):
    vc = backbone.config.vision_config
    x = torch.randn(3, 17, vc.hidden_size)
    w = _weights(backbone, adapter)
    layer = backbone.vision_model.encoder.layers[LAYER]
    # rows 0 and 2 carry the set, row 1 none: the oracle's bare block must hold for it
    ours = layer(x, Routing.per_sample([adapter, None, adapter]))
    args = (x.double(), w["vit"], vc.num_attention_heads, vc.layer_norm_eps)
    with_set, bare = oracle.vit_block(*args, w["adapter"]), oracle.vit_block(*args, None)
    _close(ours[[0, 2]], with_set[[0, 2]], bare[[0, 2]])
    assert (ours[1].double() - bare[1]).abs().max() <= TOL


@torch.no_grad()
def test_text_only_layer(backbone, adapter):
    tc = backbone.config.text_config
    x, mask = torch.randn(3, 6, tc.hidden_size), _masks(3, 6)
    w = _weights(backbone, adapter)
    layer = backbone.text_encoder.encoder.layer[LAYER]
    ours = layer(x, padding_mask(mask), Routing.per_sample([adapter, None, adapter]))
    args = (x.double(), mask, w["enc"], tc.num_attention_heads, tc.layer_norm_eps)
    with_set, bare = oracle.text_layer(*args, w["adapter"]), oracle.text_layer(*args, None)
    _close(ours[[0, 2]], with_set[[0, 2]], bare[[0, 2]])
    assert (ours[1].double() - bare[1]).abs().max() <= TOL


@pytest.mark.parametrize("tower", ["text_encoder", "text_decoder"])
@torch.no_grad()
def test_multimodal_layer_with_kv_deltas(backbone, adapter, tower):
    tc = backbone.config.text_config
    B, L, N = 3, 6, 9
    x, mask = torch.randn(B, L, tc.hidden_size), _masks(B, L)
    states = torch.randn(B, N, tc.encoder_hidden_size)
    states_mask = _masks(B, N)
    w = _weights(backbone, adapter)
    if tower == "text_encoder":
        layer, kv_module, kv, weights = (backbone.text_encoder.encoder.layer[LAYER], adapter.text_encoder_kv,
                                         w["enc_kv"], w["enc"])
        self_mask, causal = padding_mask(mask), False
    else:
        layer, kv_module, kv, weights = (backbone.text_decoder.bert.encoder.layer[LAYER], adapter.text_decoder_kv,
                                         w["dec_kv"], w["dec"])
        self_mask, causal = causal_mask(mask, L, x.device), True
    ours = layer(x, self_mask, Routing.single(adapter, B), states, padding_mask(states_mask), kv_module(states))
    args = (x.double(), mask, states.double(), states_mask, weights, tc.num_attention_heads, tc.layer_norm_eps)
    with_set = oracle.multimodal_layer(*args, w["adapter"], kv, causal=causal)
    bare = oracle.multimodal_layer(*args, None, None, causal=causal)
    no_kv = oracle.multimodal_layer(*args, w["adapter"], None, causal=causal)
    assert (with_set - no_kv).abs().max() > 1e-2  # the K/V deltas matter at this tolerance
    _close(ours, with_set, bare)
