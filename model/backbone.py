"""The one frozen BLIP backbone: vision encoder, text encoder with cross-attention, answer
decoder and the retrieval heads, with the task forward paths every adapter set routes through.

Build it with `uniadapter_serve.model.loading.load_backbone`; this module only defines it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig, BlipTextConfig, BlipVisionConfig

from uniadapter_serve.errors import InputError
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.text import DecoderCache, TextDecoder, TextModel
from uniadapter_serve.model.uniadapter import BackboneDims
from uniadapter_serve.model.vision import VisionModel

COMPONENTS: tuple[str, ...] = ("vision_model", "text_encoder", "text_decoder", "heads")
"""Parts of a backbone. `heads` = vision_proj + text_proj + itm_head (retrieval checkpoints)."""


def vision_config(config: BlipConfig) -> BlipVisionConfig:
    return cast(BlipVisionConfig, config.vision_config)


def text_config(config: BlipConfig) -> BlipTextConfig:
    return cast(BlipTextConfig, config.text_config)


class BlipBackbone(nn.Module):
    """One BLIP instance serving every task. Frozen: adapters are passed per call."""

    def __init__(self, config: BlipConfig, components: Iterable[str] = COMPONENTS) -> None:
        super().__init__()
        comps = set(components)
        unknown = comps - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; known: {COMPONENTS}")
        if "vision_model" not in comps or "text_encoder" not in comps:
            raise ValueError("a backbone needs at least vision_model and text_encoder")
        self.config = config
        vc, tc = vision_config(config), text_config(config)
        self.components = tuple(c for c in COMPONENTS if c in comps)
        self.vision_model = VisionModel(vc)
        self.text_encoder = TextModel(tc, tower="text_encoder")
        self.text_decoder = TextDecoder(tc) if "text_decoder" in comps else None
        e = config.image_text_hidden_size
        self.vision_proj = nn.Linear(vc.hidden_size, e) if "heads" in comps else None
        self.text_proj = nn.Linear(tc.hidden_size, e) if "heads" in comps else None
        self.itm_head = nn.Linear(tc.hidden_size, 2) if "heads" in comps else None
        self.fingerprints: dict[str, str] = {}
        """Per-component sha256 of the weights as loaded (see `loading.fingerprint`)."""

    @property
    def dims(self) -> BackboneDims:
        vc, tc = vision_config(self.config), text_config(self.config)
        return BackboneDims(
            vision_hidden=vc.hidden_size, text_hidden=tc.hidden_size, encoder_hidden=tc.encoder_hidden_size,
            vision_layers=vc.num_hidden_layers, text_layers=tc.num_hidden_layers,
            embed_dim=self.config.image_text_hidden_size,
        )

    @property
    def device(self) -> torch.device:
        return self.vision_model.post_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.post_layernorm.weight.dtype

    @property
    def precision(self) -> str:
        """The name of the dtype whose tolerances its outputs get (golden records, self-checks): its dtype, or
        bfloat16 where its float32 ViT runs batches under bfloat16 autocast (`VisionModel.bf16_from`)."""
        if self.dtype == torch.float32 and self.vision_model.bf16_from is not None:
            return "bfloat16"
        return str(self.dtype).removeprefix("torch.")

    def component_parameters(self) -> dict[str, int]:
        """Parameter count per component (tied decoder output weights counted once)."""
        counts = {
            "vision_model": _count(self.vision_model),
            "text_encoder": _count(self.text_encoder),
        }
        if self.text_decoder is not None:
            counts["text_decoder"] = _count(self.text_decoder)
        if self.vision_proj is not None:
            counts["heads"] = sum(_count(m) for m in (self.vision_proj, self.text_proj, self.itm_head))
        return counts

    # -- vision ---------------------------------------------------------------------------------

    def encode_image(self, pixel_values: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) image tokens."""
        return self.vision_model(pixel_values, routing)

    def encode_video(self, frames: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, N, D): each frame through the adapted ViT on its own."""
        B, T = frames.shape[:2]
        r = (routing or Routing.none(B)).repeat_interleave(T)
        tokens = self.vision_model(frames.flatten(0, 1), r)
        return tokens.unflatten(0, (B, T))

    def image_features(self, image_tokens: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """(B, N, D) image tokens -> (B, E) L2-normalised ITC embedding, float32 (normalised in float32: a
        bf16 norm is off by ~4e-3, enough to reorder close search hits)."""
        routing = routing or Routing.none(image_tokens.shape[0])
        return F.normalize(routing.head("vision_proj", image_tokens[:, 0], self.vision_proj).float(), dim=-1)

    def video_features(self, frame_tokens: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """(B, T, N, D) -> (B, E): mean of the frame [CLS] features, projected, normalised (float32)."""
        routing = routing or Routing.none(frame_tokens.shape[0])
        pooled = frame_tokens[:, :, 0].mean(dim=1)
        return F.normalize(routing.head("vision_proj", pooled, self.vision_proj).float(), dim=-1)

    def video_states(self, frame_tokens: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """(B, T, N, D) -> (B, T*N, D) cross-modal input: frame tokens concatenated, plus the
        set's temporal embedding (per frame) where it has one."""
        B, T, N, D = frame_tokens.shape
        routing = routing or Routing.none(B)

        def temporal(adapter, rows: torch.Tensor) -> torch.Tensor | None:
            emb = adapter.temporal_embedding
            if emb is None:
                return None
            if emb.shape[1] != T:
                raise InputError(f"adapter set expects {emb.shape[1]} frames per video, got {T}")
            return emb[:, :, None, :].expand(rows.shape[0], T, N, D)

        delta = routing.delta(frame_tokens, temporal)
        states = frame_tokens if delta is None else frame_tokens + delta
        return states.reshape(B, T * N, D)

    def frame_embeddings(self, frame_tokens: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """(B, T, N, D) -> (B, T, E): each frame's L2-normalised ITC embedding (float32)."""
        B, T = frame_tokens.shape[:2]
        r = (routing or Routing.none(B)).repeat_interleave(T)
        cls = frame_tokens[:, :, 0].reshape(B * T, -1)
        return F.normalize(r.head("vision_proj", cls, self.vision_proj).float(), dim=-1).view(B, T, -1)

    def frame_aware_scale(self, text_embedding: torch.Tensor, frame_embeddings: torch.Tensor, tokens_per_frame: int,
                          routing: Routing | None = None, temperature: float = 4.0) -> torch.Tensor | None:
        """Parameter-free frame-aware attention: key weights (B, T*N) for the cross-attention.

        s_t = cos(text, frame t); w_t = T * softmax_t(s_t / temperature) scales the keys of frame t's
        patch tokens (its [CLS] key and all values stay as they are). Rows whose set does not enable
        it get weight 1; None when no row does.
        """
        B, T, _ = frame_embeddings.shape
        routing = routing or Routing.none(B)
        if not any(route.adapter.config.frame_aware_attention for route in routing.routes):
            return None  # decided on the host: no device sync
        enabled = torch.zeros(B, dtype=torch.bool, device=frame_embeddings.device)
        for route in routing.routes:
            if route.adapter.config.frame_aware_attention:
                enabled[route.index if route.index is not None else slice(None)] = True
        sims = torch.einsum("be,bte->bt", text_embedding.float(), frame_embeddings.float())
        weights = T * torch.softmax(sims / temperature, dim=1)  # (B, T)
        scale = weights[:, :, None].expand(B, T, tokens_per_frame).clone()
        scale[:, :, 0] = 1.0  # each frame's [CLS] key is left alone
        scale = torch.where(enabled[:, None, None], scale, torch.ones_like(scale))
        return scale.reshape(B, T * tokens_per_frame)

    # -- text -----------------------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    routing: Routing | None = None) -> torch.Tensor:
        """Text-only (ITC) mode: (B, L) -> (B, L, D)."""
        return self.text_encoder(input_ids, attention_mask, routing=routing)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      routing: Routing | None = None) -> torch.Tensor:
        """(B, L) -> (B, E) L2-normalised ITC embedding of the [CLS] token (float32)."""
        routing = routing or Routing.none(input_ids.shape[0])
        h = self.encode_text(input_ids, attention_mask, routing)
        return F.normalize(routing.head("text_proj", h[:, 0], self.text_proj).float(), dim=-1)

    def encode_multimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          states: torch.Tensor, states_mask: torch.Tensor | None = None,
                          routing: Routing | None = None, key_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Text cross-attending to visual states: (B, L), (B, N, D) -> (B, L, D)."""
        return self.text_encoder(input_ids, attention_mask, states, states_mask, routing, key_scale=key_scale)

    def itm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   states: torch.Tensor, routing: Routing | None = None,
                   states_mask: torch.Tensor | None = None, key_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Image-text matching: -> (B, 2) logits [no match, match]."""
        routing = routing or Routing.none(input_ids.shape[0])
        h = self.encode_multimodal(input_ids, attention_mask, states, states_mask, routing, key_scale)
        return routing.head("itm_head", h[:, 0], self.itm_head)

    # -- answer decoder -------------------------------------------------------------------------

    def decoder_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       question_states: torch.Tensor | None, question_mask: torch.Tensor | None,
                       routing: Routing | None = None, cache: DecoderCache | None = None) -> torch.Tensor:
        """(B, L) answer prefix, (B, Q, D) question states -> (B, L, V) next-token logits. With a `cache`,
        input_ids are the tokens after those it holds (see `DecoderCache`)."""
        if self.text_decoder is None:
            raise InputError("this backbone has no answer decoder (load a VQA checkpoint for VQA)")
        return self.text_decoder(input_ids, attention_mask, question_states, question_mask, routing, cache)

    def decoder_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       question_states: torch.Tensor, question_mask: torch.Tensor | None,
                       routing: Routing | None = None) -> torch.Tensor:
        """(B, L) answer prefix, (B, Q, D) question states -> (B, L, D) the decoder's last states (what its LM
        head reads)."""
        if self.text_decoder is None:
            raise InputError("this backbone has no answer decoder (load a VQA checkpoint for VQA)")
        return self.text_decoder.hidden(input_ids, attention_mask, question_states, question_mask, routing)


def _count(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())
