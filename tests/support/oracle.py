"""UniAdapter's layers straight from the paper's equations, in plain float64 torch (no nn modules).

Written from `shared/reference/uniadapter.md` §1, not from our modules: tests load the same weights
into this and into our modules (or, for the converters, the original checkpoint's tensors into this
and the converted files into ours) and compare. Weights are passed by role:

    ViT block    ln1 qkv proj ln2 fc1 fc2                     (pre-LN: x + Attn(LN1 x), then + MLP(LN2 .))
    BERT layer   self.{q,k,v,o,ln} cross.{q,k,v,o,ln} ffn_in ffn_out ffn_ln   (post-LN)
    adapter      ln down up visual_up multi_up ln_cm           (one shared UniAdapter of layer i)
    K/V deltas   k.{down,up,scale} v.{down,up,scale}

each role `r` as `r.w` (and `r.b`). Equations, with h = ReLU(W_down LN(x) + b_down) and s = 0.1:

    visual(x)  = s * (W_vup h + b_vup)
    text(x)    = s * (W_up h + b_up)
    cross(x)   = s * LN_cm((W_mup h + b_mup) + (W_up h + b_up))
    dK(E)      = a_k * (W_kup (W_kdown E + b_kdown) + b_kup), dV alike  (no activation, learnable a)

    ViT block:       x' = x + Attn(LN1 x);  out = x' + MLP(LN2 x') + visual(x')
    text-only layer: a = LN(x + SelfAttn(x));  out = LN(a + FFN(a)) + text(a)
    multimodal:      a = LN(x + SelfAttn(x));  c = LN(a + CrossAttn(a; K = W_k E + b_k + dK, V = W_v E + b_v + dV))
                     out = LN(c + FFN(c)) + text(a) + cross(c)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

W = Mapping[str, torch.Tensor]
SCALE = 0.1
ADAPTER_EPS = 1e-5  # nn.LayerNorm's default, which the original adapter uses


def f64(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float64) for k, v in weights.items()}


def linear(x: torch.Tensor, w: W, role: str) -> torch.Tensor:
    return x @ w[f"{role}.w"].T + w[f"{role}.b"]


def layer_norm(x: torch.Tensor, w: W, role: str, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w[f"{role}.w"] + w[f"{role}.b"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              key_mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h)) V per head. q (B, L, D), k/v (B, N, D); key_mask (B, N) 1 = attend."""
    B, L, D = q.shape
    N, hd = k.shape[1], D // heads
    qh, kh, vh = (t.reshape(B, -1, heads, hd).transpose(1, 2) for t in (q, k, v))  # (B, H, ., hd)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(hd)  # (B, H, L, N)
    allowed = torch.ones(B, 1, L, N, dtype=torch.bool)
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(L, N, dtype=torch.bool).tril()[None, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ vh).transpose(1, 2).reshape(B, L, D)


# -- the UniAdapter -------------------------------------------------------------------------------

def _hidden(x: torch.Tensor, a: W) -> torch.Tensor:
    return torch.relu(linear(layer_norm(x, a, "ln", ADAPTER_EPS), a, "down"))


def visual_delta(x: torch.Tensor, a: W) -> torch.Tensor:
    return SCALE * linear(_hidden(x, a), a, "visual_up")


def text_delta(x: torch.Tensor, a: W) -> torch.Tensor:
    return SCALE * linear(_hidden(x, a), a, "up")


def cross_delta(x: torch.Tensor, a: W) -> torch.Tensor:
    h = _hidden(x, a)
    return SCALE * layer_norm(linear(h, a, "multi_up") + linear(h, a, "up"), a, "ln_cm", ADAPTER_EPS)


def kv_deltas(states: torch.Tensor, kv: W) -> tuple[torch.Tensor, torch.Tensor]:
    def one(p: str) -> torch.Tensor:
        return kv[f"{p}.scale"] * linear(linear(states, kv, f"{p}.down"), kv, f"{p}.up")

    return one("k"), one("v")


# -- the layers --------------------------------------------------------------------------------

def vit_block(x: torch.Tensor, w: W, heads: int, eps: float, adapter: W | None) -> torch.Tensor:
    """(B, N, D) -> (B, N, D): one pre-LN ViT block with the visual adapter parallel to the MLP."""
    D = x.shape[-1]
    q, k, v = linear(layer_norm(x, w, "ln1", eps), w, "qkv").split(D, dim=-1)
    x = x + linear(attention(q, k, v, heads), w, "proj")
    out = x + linear(gelu(linear(layer_norm(x, w, "ln2", eps), w, "fc1")), w, "fc2")
    return out if adapter is None else out + visual_delta(x, adapter)


def _bert_attention(x: torch.Tensor, kv_in: torch.Tensor, w: W, p: str, heads: int, eps: float,
                    key_mask: torch.Tensor | None, causal: bool = False,
                    deltas: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    q, k, v = linear(x, w, f"{p}.q"), linear(kv_in, w, f"{p}.k"), linear(kv_in, w, f"{p}.v")
    if deltas is not None:
        k, v = k + deltas[0], v + deltas[1]
    ctx = attention(q, k, v, heads, key_mask, causal)
    return layer_norm(x + linear(ctx, w, f"{p}.o"), w, f"{p}.ln", eps)


def _ffn(x: torch.Tensor, w: W, eps: float) -> torch.Tensor:
    return layer_norm(x + linear(gelu(linear(x, w, "ffn_in")), w, "ffn_out"), w, "ffn_ln", eps)


def text_layer(x: torch.Tensor, mask: torch.Tensor | None, w: W, heads: int, eps: float,
               adapter: W | None) -> torch.Tensor:
    """Text-only (ITC) mode: (B, L, D) -> (B, L, D); the textual adapter after the FFN."""
    a = _bert_attention(x, x, w, "self", heads, eps, mask)
    out = _ffn(a, w, eps)
    return out if adapter is None else out + text_delta(a, adapter)


def multimodal_layer(x: torch.Tensor, mask: torch.Tensor | None, states: torch.Tensor,
                     states_mask: torch.Tensor | None, w: W, heads: int, eps: float, adapter: W | None,
                     kv: W | None, causal: bool = False) -> torch.Tensor:
    """Cross-modal mode (ITM / question encoder; `causal` for the answer decoder): (B, L, D), (B, N, E) -> (B, L, D)."""
    a = _bert_attention(x, x, w, "self", heads, eps, mask, causal=causal)
    deltas = kv_deltas(states, kv) if kv is not None else None
    c = _bert_attention(a, states, w, "cross", heads, eps, states_mask, deltas=deltas)
    out = _ffn(c, w, eps)
    if adapter is None:
        return out
    return out + text_delta(a, adapter) + cross_delta(c, adapter)


# -- weights by role, from original (BLIP / UniAdapter) names --------------------------------------

ORIGINAL_VIT = {"ln1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "ln2": "norm2", "fc1": "mlp.fc1",
                "fc2": "mlp.fc2"}
ORIGINAL_BERT = {"self.q": "attention.self.query", "self.k": "attention.self.key", "self.v": "attention.self.value",
                 "self.o": "attention.output.dense", "self.ln": "attention.output.LayerNorm",
                 "cross.q": "crossattention.self.query", "cross.k": "crossattention.self.key",
                 "cross.v": "crossattention.self.value", "cross.o": "crossattention.output.dense",
                 "cross.ln": "crossattention.output.LayerNorm", "ffn_in": "intermediate.dense",
                 "ffn_out": "output.dense", "ffn_ln": "output.LayerNorm"}
ORIGINAL_ADAPTER = {"ln": "adapter_layer_norm_before", "down": "down_proj", "up": "up_proj",
                    "visual_up": "visual_up_proj", "multi_up": "multi_up_proj",
                    "ln_cm": "adapter_layer_norm_cross_modal"}
ORIGINAL_KV = {"k": "video_key_adapter", "v": "video_value_adapter"}


def by_role(state: Mapping[str, torch.Tensor], prefix: str, roles: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """{role.w, role.b} from `state[prefix + name + .weight/.bias]` (float64)."""
    out = {}
    for role, name in roles.items():
        for suffix, short in (("weight", "w"), ("bias", "b")):
            key = f"{prefix}{name}.{suffix}"
            if key in state:
                out[f"{role}.{short}"] = state[key]
    return f64(out)


def kv_by_role(state: Mapping[str, torch.Tensor], prefix: str,
               names: Mapping[str, str] = ORIGINAL_KV) -> dict[str, torch.Tensor]:
    """{k,v}.{down,up}.{w,b} and {k,v}.scale from `state[prefix + name + .down_proj/.up_proj/.scale]` (float64)."""
    out = {}
    for role, name in names.items():
        for part in ("down", "up"):
            out[f"{role}.{part}.w"] = state[f"{prefix}{name}.{part}_proj.weight"]
            out[f"{role}.{part}.b"] = state[f"{prefix}{name}.{part}_proj.bias"]
        out[f"{role}.scale"] = state[f"{prefix}{name}.scale"]
    return f64(out)
