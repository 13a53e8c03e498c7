"""UniAdapter modules: the per-layer shared adapter, the cross-attention K/V low-rank deltas,
and the `AdapterSetModule` that holds everything one task trains.

Names of the per-layer tensors follow the original code (`down_proj`, `up_proj`,
`visual_up_proj`, `multi_up_proj`, `adapter_layer_norm_before`,
`adapter_layer_norm_cross_modal`) so converted checkpoints map 1:1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from uniadapter_serve.errors import ConfigError

Task = Literal["retrieval", "vqa", "videoqa"]
TASKS: tuple[str, ...] = ("retrieval", "vqa", "videoqa")
HEAD_NAMES: tuple[str, ...] = ("vision_proj", "text_proj", "itm_head")


@dataclass
class UniAdapterConfig:
    """Shape and placement of one adapter set. Stored in `adapter_config.json`."""

    task: str = "retrieval"
    bottleneck: int = 512
    """Width of the shared down-projection (512 in the released configs, 64-128 for 1-2 %)."""
    scale: float = 0.1
    """Fixed output scale of every adapter branch."""
    layers: list[int] | None = None
    """Layer indices that get an adapter; None means every layer."""
    visual: bool = True
    """Visual branch, parallel to the FFN of each ViT block."""
    textual: bool = True
    """Textual branch: after the FFN in text-only layers; the "query residual" in multimodal ones."""
    cross_modal: bool = True
    """Cross-modal branch on the cross-attention output (reuses the textual up-projection)."""
    decoder: bool = True
    """Apply the same adapters (and a decoder K/V pair) in the answer decoder (VQA tasks)."""
    kv_rank: int = 64
    """Rank of the low-rank K/V deltas in cross-attention; 0 disables them."""
    heads: list[str] = field(default_factory=list)
    """Task heads the set carries (retrieval: vision_proj, text_proj, itm_head)."""
    temporal_embedding: bool = False
    """Learned per-frame embedding added to frame tokens before cross-attention (video)."""
    num_frames: int = 8
    """Frames sampled per video for this set."""
    frame_aware_attention: bool = False
    """Parameter-free frame-aware attention in cross-attention (video retrieval / QA)."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if not 1 <= self.bottleneck <= 65536:
            raise ConfigError(f"bottleneck must be in [1, 65536], got {self.bottleneck}")
        if self.kv_rank < 0:
            raise ConfigError(f"kv_rank must be >= 0, got {self.kv_rank}")
        if not math.isfinite(self.scale):
            raise ConfigError(f"scale must be finite, got {self.scale}")
        unknown = [h for h in self.heads if h not in HEAD_NAMES]
        if unknown:
            raise ConfigError(f"unknown heads {unknown}; known heads are {HEAD_NAMES}")
        if self.num_frames < 1:
            raise ConfigError(f"num_frames must be >= 1, got {self.num_frames}")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise ConfigError(f"layer indices must be >= 0, got {self.layers}")

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> UniAdapterConfig:
        """Defaults per task: retrieval sets carry their heads; video sets a temporal embedding."""
        defaults: dict[str, Any] = {"task": task}
        if task == "retrieval":
            defaults["heads"] = list(HEAD_NAMES)
        if task == "videoqa":
            defaults["temporal_embedding"] = True
        defaults.update(overrides)
        return cls(**defaults)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniAdapterConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown adapter config fields {unknown}")
        return cls(**data)


class UniAdapterLayer(nn.Module):
    """One adapter for layer index i, shared by the ViT block i and BERT layer i.

    LayerNorm and down-projection are shared across branches; each branch has its own
    up-projection and the cross-modal branch also adds the textual up-projection.
    Every branch returns only the delta (no residual), times the fixed scale.
    """

    def __init__(self, dim: int, bottleneck: int, scale: float, *, visual: bool, textual: bool,
                 cross_modal: bool) -> None:
        super().__init__()
        self.scale = scale
        self.adapter_layer_norm_before = nn.LayerNorm(dim, eps=1e-5)
        self.down_proj = nn.Linear(dim, bottleneck)
        # The textual up-projection is part of the cross-modal branch too (partial sharing).
        self.up_proj = nn.Linear(bottleneck, dim) if (textual or cross_modal) else None
        self.visual_up_proj = nn.Linear(bottleneck, dim) if visual else None
        self.multi_up_proj = nn.Linear(bottleneck, dim) if cross_modal else None
        self.adapter_layer_norm_cross_modal = nn.LayerNorm(dim, eps=1e-5) if cross_modal else None
        self.has_textual = textual

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.down_proj(self.adapter_layer_norm_before(x)))  # (..., r)

    def visual(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.visual_up_proj is None:
            return None
        return self.visual_up_proj(self._hidden(x)) * self.scale

    def textual(self, x: torch.Tensor) -> torch.Tensor | None:
        if not self.has_textual or self.up_proj is None:
            return None
        return self.up_proj(self._hidden(x)) * self.scale

    def cross_modal(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.multi_up_proj is None or self.adapter_layer_norm_cross_modal is None:
            return None
        assert self.up_proj is not None
        h = self._hidden(x)
        return self.adapter_layer_norm_cross_modal(self.multi_up_proj(h) + self.up_proj(h)) * self.scale

    def up_projections(self) -> list[nn.Linear]:
        return [m for m in (self.up_proj, self.visual_up_proj, self.multi_up_proj) if m is not None]


class LowRankDelta(nn.Module):
    """Linear -> Linear (no activation) times a learnable scalar: one K or V delta."""

    def __init__(self, in_dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        self.down_proj = nn.Linear(in_dim, rank)
        self.up_proj = nn.Linear(rank, out_dim)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.down_proj(x)) * self.scale


class CrossKVAdapter(nn.Module):
    """The K and V deltas of one text tower; computed once per forward from the encoder
    states and added to the keys/values of every cross-attention layer."""

    def __init__(self, encoder_dim: int, dim: int, rank: int) -> None:
        super().__init__()
        self.key_adapter = LowRankDelta(encoder_dim, dim, rank)
        self.value_adapter = LowRankDelta(encoder_dim, dim, rank)

    def forward(self, encoder_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # encoder_states: (B, N, E) -> two (B, N, D)
        return self.key_adapter(encoder_states), self.value_adapter(encoder_states)


@dataclass(frozen=True)
class BackboneDims:
    """What an adapter set needs to know about the backbone's shapes."""

    vision_hidden: int
    text_hidden: int
    encoder_hidden: int
    vision_layers: int
    text_layers: int
    embed_dim: int

    @property
    def num_layers(self) -> int:
        return max(self.vision_layers, self.text_layers)


class AdapterSetModule(nn.Module):
    """Everything one task trains: per-layer adapters, K/V deltas, heads, temporal embedding."""

    def __init__(self, config: UniAdapterConfig, dims: BackboneDims, *, init: bool = True) -> None:
        super().__init__()
        if dims.vision_hidden != dims.text_hidden:
            raise ConfigError(
                "UniAdapter shares each adapter between ViT block i and BERT layer i, which needs "
                f"equal widths; vision hidden {dims.vision_hidden} != text hidden {dims.text_hidden}"
            )
        self.config = config
        self.dims = dims
        layers = config.layers if config.layers is not None else list(range(dims.num_layers))
        bad = [i for i in layers if i >= dims.num_layers]
        if bad:
            raise ConfigError(f"adapter layers {bad} do not exist; the backbone has {dims.num_layers} layers")
        d = dims.text_hidden
        self.adapters = nn.ModuleDict({
            str(i): UniAdapterLayer(d, config.bottleneck, config.scale, visual=config.visual,
                                    textual=config.textual, cross_modal=config.cross_modal)
            for i in sorted(set(layers))
        })
        rank = config.kv_rank
        self.text_encoder_kv = CrossKVAdapter(dims.encoder_hidden, d, rank) if rank else None
        use_decoder = config.decoder and config.task in ("vqa", "videoqa")
        # The decoder cross-attends to question states (text width), not to image tokens.
        self.text_decoder_kv = CrossKVAdapter(d, d, rank) if (rank and use_decoder) else None
        self.use_decoder = use_decoder
        self.vision_proj = nn.Linear(dims.vision_hidden, dims.embed_dim) if "vision_proj" in config.heads else None
        self.text_proj = nn.Linear(d, dims.embed_dim) if "text_proj" in config.heads else None
        self.itm_head = nn.Linear(d, 2) if "itm_head" in config.heads else None
        self.temporal_embedding = (
            nn.Parameter(torch.zeros(1, config.num_frames, dims.vision_hidden))
            if config.temporal_embedding else None
        )
        if init:  # skipped when weights are loaded right after (e.g. on the meta device)
            self.reset_parameters()

    def layer(self, i: int) -> UniAdapterLayer | None:
        key = str(i)
        return self.adapters[key] if key in self.adapters else None  # type: ignore[return-value]  # noqa: SIM401

    def head(self, name: str) -> nn.Linear | None:
        return getattr(self, name, None) if name in HEAD_NAMES else None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The method's intended init (not the original code's overwritten one): kaiming-uniform
        down-projections, zero up-projections, so a fresh set equals the bare backbone."""
        for adapter in self.adapters.values():
            assert isinstance(adapter, UniAdapterLayer)
            nn.init.kaiming_uniform_(adapter.down_proj.weight, a=math.sqrt(5))
            nn.init.zeros_(adapter.down_proj.bias)
            for up in adapter.up_projections():
                nn.init.zeros_(up.weight)
                nn.init.zeros_(up.bias)
        for kv in (self.text_encoder_kv, self.text_decoder_kv):
            if kv is None:
                continue
            for delta in (kv.key_adapter, kv.value_adapter):
                nn.init.kaiming_uniform_(delta.down_proj.weight, a=math.sqrt(5))
                nn.init.zeros_(delta.down_proj.bias)
                nn.init.zeros_(delta.up_proj.weight)
                nn.init.zeros_(delta.up_proj.bias)
                delta.scale.fill_(1.0)

    @torch.no_grad()
    def zero_up_projections(self) -> None:
        """Zero every up-projection: the set then leaves the backbone's outputs unchanged.

        The cross-modal branch ends in a LayerNorm, whose bias is its output for a zero input,
        so that bias is zeroed too (the original code froze that LayerNorm at 1/0).
        """
        for adapter in self.adapters.values():
            assert isinstance(adapter, UniAdapterLayer)
            for up in adapter.up_projections():
                up.weight.zero_()
                up.bias.zero_()
            if adapter.adapter_layer_norm_cross_modal is not None:
                adapter.adapter_layer_norm_cross_modal.bias.zero_()
        for kv in (self.text_encoder_kv, self.text_decoder_kv):
            if kv is not None:
                for delta in (kv.key_adapter, kv.value_adapter):
                    delta.up_proj.weight.zero_()
                    delta.up_proj.bias.zero_()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}
