"""BLIP's BERT text tower (encoder with cross-attention, and the answer decoder) with the
UniAdapter textual / cross-modal branches and the low-rank K/V deltas.

Parameter names follow transformers' `BlipTextModel` / `BlipTextLMHeadModel`.
A layer runs in one of two modes: text-only (no encoder states: ITC text encoder) or
multimodal (cross-attention to image tokens or, in the decoder, to question states).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipTextConfig
from transformers.activations import ACT2FN

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.uniadapter import AdapterSetModule

Tower = Literal["text_encoder", "text_decoder"]


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, L) 1/0 mask -> (B, 1, 1, L) bool for SDPA, or None when nothing is masked. Whether anything
    is masked is only checked for host tensors: on a GPU the check would be a sync per forward pass
    (callers that know every row is full pass None)."""
    if attention_mask is None or (attention_mask.device.type == "cpu" and bool(attention_mask.all())):
        return None
    return attention_mask.bool()[:, None, None, :]


def causal_mask(attention_mask: torch.Tensor | None, length: int, device: torch.device,
                offset: int = 0) -> torch.Tensor:
    """(B, 1, L, offset + L) bool: token i (at position offset + i) sees positions <= offset + i and, if given,
    not the padded ones (attention_mask covers all offset + L positions)."""
    causal = torch.ones(length, offset + length, dtype=torch.bool, device=device).tril(diagonal=offset)[None, None]
    if attention_mask is None:
        return causal
    return causal & attention_mask.bool()[:, None, None, :]


@dataclass
class LayerCache:
    cross_k: torch.Tensor
    """(B', H, Q, hd) cross-attention keys of the question states (the set's K/V delta included)"""
    cross_v: torch.Tensor
    self_k: torch.Tensor | None = None
    """(B, H, t, hd) self-attention keys of the tokens decoded so far"""
    self_v: torch.Tensor | None = None


@dataclass
class DecoderCache:
    """What incremental decoding keeps: per layer, the question's cross-attention K/V, computed once per
    request, and the self-attention K/V of past tokens. The cross K/V may serve B = B' * g rows (g
    candidate answers per question): they are broadcast across each group, never copied."""

    layers: list[LayerCache] = field(default_factory=list)
    states_mask: torch.Tensor | None = None
    """(B', 1, 1, Q) bool key mask of the question states"""
    length: int = 0
    """tokens decoded so far"""

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep the past self-attention K/V of these rows (beam search: each beam's source beam), in order."""
        for c in self.layers:
            if c.self_k is not None and c.self_v is not None:
                c.self_k, c.self_v = c.self_k.index_select(0, rows), c.self_v.index_select(0, rows)

    def cross_only(self) -> DecoderCache:
        """The same question, no tokens: to score other token sequences against it."""
        return DecoderCache([LayerCache(c.cross_k, c.cross_v) for c in self.layers], self.states_mask, 0)


class TextEmbeddings(nn.Module):
    position_ids: torch.Tensor

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(float(config.hidden_dropout_prob))
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False
        )

    def forward(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        L = input_ids.shape[1]
        if self.position_embeddings.num_embeddings < offset + L:
            raise ValueError(f"text of {offset + L} tokens exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, offset:offset + L])
        return self.dropout(self.LayerNorm(x))


class TextSelfAttention(nn.Module):
    def __init__(self, config: BlipTextConfig, cross: bool) -> None:
        super().__init__()
        d = config.hidden_size
        kv_in = config.encoder_hidden_size if cross else d
        self.num_heads = config.num_attention_heads
        self.dropout = float(config.attention_probs_dropout_prob)
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_in, d)
        self.value = nn.Linear(kv_in, d)

    def keys_values(self, src: torch.Tensor, kv_delta: tuple[torch.Tensor, torch.Tensor] | None = None,
                    key_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, E) -> keys, values (B, H, N, hd)."""
        B = src.shape[0]
        H = self.num_heads
        k, v = self.key(src), self.value(src)  # (B, N, D)
        if kv_delta is not None:
            # UniAdapter K/V low-rank deltas (the same delta in every cross-attention layer).
            k, v = k + kv_delta[0], v + kv_delta[1]
        hd = k.shape[-1] // H
        k = k.view(B, -1, H, hd).transpose(1, 2)
        v = v.view(B, -1, H, hd).transpose(1, 2)
        if key_scale is not None:  # frame-aware attention: (B, N) weights on the keys
            k = k * key_scale[:, None, :, None].to(k.dtype)
        return k, v

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Queries of x (B, L, D) against k, v (B', H, N, hd). B' < B: each group of B / B' consecutive rows
        shares one row's keys (candidate answers of one question), broadcast, not copied."""
        B, L, D = x.shape
        H, hd = self.num_heads, D // self.num_heads
        q = self.query(x).view(B, L, H, hd).transpose(1, 2)  # (B, H, L, hd)
        p = self.dropout if self.training else 0.0
        if k.shape[0] == B:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, H, L, hd)
        else:  # the g rows of a group are more queries against the same keys: (groups, H, g*L, hd)
            groups = k.shape[0]
            g = B // groups
            qg = q.reshape(groups, g, H, L, hd).transpose(1, 2).reshape(groups, H, g * L, hd)
            if mask is not None and mask.shape[-2] != 1:
                raise ValueError("grouped keys take a key mask only (one row per group)")
            ctx = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, dropout_p=p)
            ctx = ctx.reshape(groups, H, g, L, hd).transpose(1, 2).reshape(B, H, L, hd)
        return ctx.transpose(1, 2).reshape(B, L, D)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, states: torch.Tensor | None = None,
                kv_delta: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_scale: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.keys_values(x if states is None else states, kv_delta, key_scale)
        return self.attend(x, k, v, mask)


class TextSelfOutput(nn.Module):
    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(float(config.hidden_dropout_prob))

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class TextAttention(nn.Module):
    def __init__(self, config: BlipTextConfig, cross: bool = False) -> None:
        super().__init__()
        self.self = TextSelfAttention(config, cross)
        self.output = TextSelfOutput(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, states: torch.Tensor | None = None,
                kv_delta: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask, states, kv_delta, key_scale), x)


class TextIntermediate(nn.Module):
    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class TextOutput(nn.Module):
    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(float(config.hidden_dropout_prob))

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class TextLayer(nn.Module):
    def __init__(self, config: BlipTextConfig, index: int, tower: Tower) -> None:
        super().__init__()
        self.index = index
        self.tower = tower
        self.attention = TextAttention(config)
        self.crossattention = TextAttention(config, cross=True)
        self.intermediate = TextIntermediate(config)
        self.output = TextOutput(config)

    def _adapter(self, adapter: AdapterSetModule):
        if self.tower == "text_decoder" and not adapter.use_decoder:
            return None
        return adapter.layer(self.index)

    def _textual(self, adapter: AdapterSetModule, rows: torch.Tensor) -> torch.Tensor | None:
        layer = self._adapter(adapter)
        return layer.textual(rows) if layer is not None else None

    def _cross_modal(self, adapter: AdapterSetModule, rows: torch.Tensor) -> torch.Tensor | None:
        layer = self._adapter(adapter)
        return layer.cross_modal(rows) if layer is not None else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, routing: Routing,
                states: torch.Tensor | None = None, states_mask: torch.Tensor | None = None,
                kv_delta: tuple[torch.Tensor, torch.Tensor] | None = None,
                key_scale: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        if cache is None:
            attn = self.attention(x, mask)
        else:  # incremental: this step's keys/values join the past ones
            sa = self.attention.self
            k, v = sa.keys_values(x)
            if cache.self_k is not None and cache.self_v is not None:
                k, v = torch.cat([cache.self_k, k], dim=2), torch.cat([cache.self_v, v], dim=2)
            cache.self_k, cache.self_v = k, v
            attn = self.attention.output(sa.attend(x, k, v, mask), x)
        # Text-only mode: textual adapter after the FFN. Multimodal mode: the same textual
        # adapter as "query residual" on the self-attention output.
        delta_text = routing.delta(attn, self._textual)
        if states is None and cache is None:
            out = self.output(self.intermediate(attn), attn)
            return out if delta_text is None else out + delta_text
        if cache is not None:
            ca = self.crossattention.self
            cross = self.crossattention.output(ca.attend(attn, cache.cross_k, cache.cross_v, states_mask), attn)
        else:
            cross = self.crossattention(attn, states_mask, states, kv_delta, key_scale)
        delta_cross = routing.delta(cross, self._cross_modal)
        out = self.output(self.intermediate(cross), cross)
        if delta_text is not None:
            out = out + delta_text
        if delta_cross is not None:
            out = out + delta_cross
        return out


class TextEncoder(nn.Module):
    def __init__(self, config: BlipTextConfig, tower: Tower) -> None:
        super().__init__()
        self.layer = nn.ModuleList([TextLayer(config, i, tower) for i in range(config.num_hidden_layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, routing: Routing,
                states: torch.Tensor | None, states_mask: torch.Tensor | None,
                kv_delta: tuple[torch.Tensor, torch.Tensor] | None,
                key_scale: torch.Tensor | None = None, cache: DecoderCache | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.layer):
            x = layer(x, mask, routing, states, states_mask, kv_delta, key_scale,
                      cache.layers[i] if cache is not None else None)
        return x


class TextModel(nn.Module):
    """BERT with cross-attention. `states=None` runs the text-only (ITC) mode."""

    def __init__(self, config: BlipTextConfig, tower: Tower = "text_encoder") -> None:
        super().__init__()
        self.config = config
        self.tower: Tower = tower
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextEncoder(config, tower)

    def _kv(self, adapter: AdapterSetModule, rows: torch.Tensor) -> torch.Tensor | None:
        kv = adapter.text_encoder_kv if self.tower == "text_encoder" else adapter.text_decoder_kv
        if kv is None:
            return None
        dk, dv = kv(rows)
        return torch.cat([dk, dv], dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                states: torch.Tensor | None = None, states_mask: torch.Tensor | None = None,
                routing: Routing | None = None, causal: bool = False,
                key_scale: torch.Tensor | None = None, cache: DecoderCache | None = None) -> torch.Tensor:
        # input_ids: (B, L); states: (B, N, E); key_scale: (B, N) -> (B, L, D)
        # with `cache`: input_ids are the next L tokens after cache.length; attention_mask covers all of them
        routing = routing or Routing.none(input_ids.shape[0])
        offset = cache.length if cache is not None else 0
        x = self.embeddings(input_ids, offset)
        mask: torch.Tensor | None
        if causal:
            mask = causal_mask(attention_mask, input_ids.shape[1], input_ids.device, offset)
            if cache is not None and input_ids.shape[1] == 1 and attention_mask is None:
                mask = None  # one new token sees every past one
        else:
            mask = padding_mask(attention_mask)
        kv_delta = None
        if states is not None and (cache is None or not cache.layers):
            both = routing.delta(states, self._kv)
            if both is not None:
                dk, dv = both.chunk(2, dim=-1)
                kv_delta = (dk, dv)
        if cache is not None and not cache.layers:  # the question's cross K/V, once per request
            if states is None:
                raise ValueError("the first decoding step needs the question states")
            layers: list[TextLayer] = list(self.encoder.layer)  # type: ignore[arg-type]
            cache.layers = [LayerCache(*layer.crossattention.self.keys_values(states, kv_delta, key_scale))
                            for layer in layers]
            cache.states_mask = padding_mask(states_mask)
        states_key_mask = cache.states_mask if cache is not None else padding_mask(states_mask)
        out = self.encoder(x, mask, routing, states, states_key_mask, kv_delta, key_scale, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return out


class PredictionHeadTransform(nn.Module):
    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(x)))


class LMPredictionHead(nn.Module):
    """Output weights are tied to the decoder's word embeddings; only the bias is its own."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.transform = PredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))


class LMHead(nn.Module):
    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.predictions = LMPredictionHead(config)


class TextDecoder(nn.Module):
    """The answer decoder: causal BERT cross-attending to question states, plus LM head."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.bert = TextModel(config, tower="text_decoder")
        self.cls = LMHead(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, states: torch.Tensor | None,
                states_mask: torch.Tensor | None, routing: Routing | None = None,
                cache: DecoderCache | None = None) -> torch.Tensor:
        """-> (B, L, V) next-token logits (with `cache`: of the L new tokens)."""
        h = self.cls.predictions.transform(self.hidden(input_ids, attention_mask, states, states_mask, routing, cache))
        return F.linear(h, self.bert.embeddings.word_embeddings.weight, self.cls.predictions.bias)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, states: torch.Tensor | None,
               states_mask: torch.Tensor | None, routing: Routing | None = None,
               cache: DecoderCache | None = None) -> torch.Tensor:
        """-> (B, L, D): the last layer's states, before the LM head."""
        return self.bert(input_ids, attention_mask, states, states_mask, routing, causal=True, cache=cache)
