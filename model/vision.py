"""BLIP's ViT with the UniAdapter visual branch, parallel to the FFN of each block.

Parameter names follow transformers' `BlipVisionModel` so its state dicts load 1:1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipVisionConfig
from transformers.activations import ACT2FN

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.uniadapter import AdapterSetModule


class VisionEmbeddings(nn.Module):
    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, int(config.patch_size)  # type: ignore[arg-type]
        self.patch_size = p
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, d))
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=p, stride=p)
        num_patches = (int(config.image_size) // p) ** 2  # type: ignore[arg-type]
        self.position_embedding = nn.Parameter(torch.zeros(1, num_patches + 1, d))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values: (B, 3, H, W) -> (B, 1 + H/p * W/p, D)
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1).to(dtype)
        x = torch.cat([cls, patches], dim=1)
        if x.shape[1] != self.position_embedding.shape[1]:
            raise ValueError(
                f"image gives {x.shape[1] - 1} patches but the model was built for "
                f"{self.position_embedding.shape[1] - 1}; resize images to the model's image_size"
            )
        return x + self.position_embedding.to(dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        d = config.hidden_size
        self.dropout = float(config.attention_dropout)
        self.qkv = nn.Linear(d, 3 * d)
        self.projection = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, H, N, hd)
        p = self.dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.projection(ctx.transpose(1, 2).reshape(B, N, D))


class VisionMLP(nn.Module):
    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: BlipVisionConfig, index: int) -> None:
        super().__init__()
        self.index = index
        d = config.hidden_size
        self.self_attn = VisionAttention(config)
        self.layer_norm1 = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def _visual(self, adapter: AdapterSetModule, rows: torch.Tensor) -> torch.Tensor | None:
        layer = adapter.layer(self.index)
        return layer.visual(rows) if layer is not None else None

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        out = x + self.mlp(self.layer_norm2(x))
        # UniAdapter: visual adapter on the residual stream, parallel to the FFN.
        delta = routing.delta(x, self._visual)
        return out if delta is None else out + delta


class VisionEncoder(nn.Module):
    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([VisionLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, routing)
        return x


class VisionModel(nn.Module):
    """(B, 3, H, W) pixels -> (B, 1 + patches, D) tokens after the final LayerNorm."""

    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.bf16_from: int | None = None
        """A float32 model on a CPU runs batches of at least this many frames under bfloat16 autocast (the linear
        layers, attention and the adapters' projections in bf16; residual stream, LayerNorms and the output in
        float32), the text towers untouched: the service's VIT_BF16_FROM. None: never."""

    def forward(self, pixel_values: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        routing = routing or Routing.none(pixel_values.shape[0])
        if self.autocasts(pixel_values.shape[0], pixel_values.device):
            with torch.autocast("cpu", torch.bfloat16):
                tokens = self.encoder(self.embeddings(pixel_values), routing)
            return self.post_layernorm(tokens.float())
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values), routing))

    def autocasts(self, frames: int, device: torch.device) -> bool:
        """Whether a batch of `frames` runs under bfloat16 autocast (see `bf16_from`)."""
        return (self.bf16_from is not None and frames >= self.bf16_from and device.type == "cpu"
                and self.post_layernorm.weight.dtype == torch.float32)
