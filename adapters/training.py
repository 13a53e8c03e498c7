"""`uniadapter train`: train an adapter set on the frozen backbone (UniAdapter), or the baselines the
paper compares with: the task heads only on a frozen backbone, and full fine-tuning.

Retrieval: ITC + ITM (BLIP's losses). VQA / VideoQA: answer language modelling with label
smoothing 0.1. Progress bar, periodic checkpoints, resume from the last checkpoint.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from uniadapter_serve.adapters.datasets import QA, ImageText
from uniadapter_serve.adapters.losses import itc_loss, itm_loss, lm_loss
from uniadapter_serve.errors import ConfigError, InputError
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.media.video import decode_video
from uniadapter_serve.model.preprocess import array_to_tensor
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text
from uniadapter_serve.model.uniadapter import HEAD_NAMES, AdapterSetModule, UniAdapterConfig

log = logging.getLogger(__name__)

MODES = ("uniadapter", "heads", "full")


@dataclass
class TrainConfig:
    task: str = "retrieval"
    mode: str = "uniadapter"
    """uniadapter | heads (frozen backbone, task heads only: retrieval's projections + ITM head, the
    answer decoder's prediction head for VQA/VideoQA) | full (fine-tune everything)"""
    steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    bottleneck: int = 64
    kv_rank: int = 16
    num_frames: int = 8
    label_smoothing: float = 0.1
    seed: int = 0
    temporal: bool = False
    """retrieval on video: temporal embedding + frame-aware attention (UniAdapter's MSRVTT setting)"""
    checkpoint_every: int = 200
    group_draw: int = 2
    """items of a group (`ImageText.group`) drawn into a batch together: each draw brings group_draw - 1 other
    members as hard negatives (1: plain sampling)"""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.group_draw < 1:
            raise ConfigError("steps, batch_size, lr and group_draw must be positive")


DECODER_HEAD = "text_decoder.cls.predictions."
"""the answer decoder's prediction head (transform + output bias; the output matrix is tied to the
word embeddings, which stay frozen)"""


@dataclass
class TrainResult:
    backbone: BlipBackbone
    """the (shared, untouched) backbone, or the trained copy (`full`; `heads` for VQA/VideoQA)"""
    adapter: AdapterSetModule | None
    losses: list[float]
    tunable_parameters: int = 0


VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mkv", ".mov")


def pixels(media: np.ndarray | list[np.ndarray] | str, size: int, num_frames: int = 8) -> torch.Tensor:
    """Pixels of an image or clip at model size -> (T, 3, S, S): demo arrays (or frame lists), image
    files, or video files (T = num_frames sampled uniformly in time, as the service does)."""
    if isinstance(media, str):
        if media.lower().endswith(VIDEO_SUFFIXES):
            try:
                data = Path(media).read_bytes()
            except OSError as e:
                raise InputError(f"cannot read video {media}: {e}") from e
            return decode_video(data, num_frames=num_frames, size=size, max_bytes=len(data) + 1,
                                max_seconds=24 * 3600.0, max_pixels=8192 * 8192, field=media)
        from PIL import Image

        from uniadapter_serve.model.preprocess import image_to_tensor

        return image_to_tensor(Image.open(media), size)[None]
    frames = media if isinstance(media, list) else [media]
    if frames[0].shape[0] != size:
        from PIL import Image

        from uniadapter_serve.model.preprocess import image_to_tensor

        return torch.stack([image_to_tensor(Image.fromarray(f), size) for f in frames])
    return torch.stack([array_to_tensor(f) for f in frames])


def visual(model: BlipBackbone, media: Sequence[Any], routing: Routing, size: int,
           num_frames: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(features for ITC, states for cross-attention) of a batch of images or a batch of clips."""
    clips = [pixels(m, size, num_frames) for m in media]
    if len({c.shape[0] for c in clips}) != 1:
        raise InputError("a batch mixes images and clips (or clips of different lengths)")
    if clips[0].shape[0] == 1:
        tokens = model.encode_image(torch.cat(clips).to(model.device, model.dtype), routing)
        return model.image_features(tokens, routing), tokens
    frame_tokens = model.encode_video(torch.stack(clips).to(model.device, model.dtype), routing)
    return model.video_features(frame_tokens, routing), model.video_states(frame_tokens, routing)


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then cosine decay to 0 at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def optimize(loss: torch.Tensor, optimizer: torch.optim.Optimizer, schedule: Any,
             params: Sequence[torch.Tensor]) -> float:
    """One step: backward, clip the gradient norm at 5, update, advance the schedule; -> the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 5.0)
    optimizer.step()
    schedule.step()
    return float(loss.detach())


def adapter_config_for(cfg: TrainConfig) -> UniAdapterConfig:
    if cfg.mode == "heads":
        # no adapter branches: just the heads (retrieval) on the frozen backbone
        return UniAdapterConfig(task=cfg.task, bottleneck=1, layers=[], kv_rank=0, visual=False, textual=False,
                                cross_modal=False, heads=list(HEAD_NAMES) if cfg.task == "retrieval" else [],
                                num_frames=cfg.num_frames)
    video = {"temporal_embedding": True, "frame_aware_attention": True} if cfg.temporal else {}
    return UniAdapterConfig.for_task(cfg.task, bottleneck=cfg.bottleneck, kv_rank=cfg.kv_rank,
                                     num_frames=cfg.num_frames, **video)


def _init_heads_from_backbone(adapter: AdapterSetModule, backbone: BlipBackbone) -> None:
    with torch.no_grad():
        for name in HEAD_NAMES:
            head, source = adapter.head(name), getattr(backbone, name)
            if head is not None and source is not None:
                head.load_state_dict(source.state_dict())


def train(backbone: BlipBackbone, tokenizer: BlipTokenizer, data: Sequence[ImageText] | Sequence[QA],
          cfg: TrainConfig, *, checkpoint_dir: str | Path | None = None, progress: bool = True,
          time_budget_s: float | None = None) -> TrainResult:
    """Train per `cfg`. The shared backbone is never modified (full fine-tuning, and heads-only VQA /
    VideoQA, train a copy).

    With `checkpoint_dir`, a run resumes from the last checkpoint there; `time_budget_s` stops early
    (after a checkpoint) so long trainings can be run in slices."""
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if cfg.mode == "full" or (cfg.mode == "heads" and cfg.task != "retrieval"):
        model = copy.deepcopy(backbone)
        adapter = None
        for name, p in model.named_parameters():
            p.requires_grad_(cfg.mode == "full" or name.startswith(DECODER_HEAD))
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("the backbone has no answer decoder head to train")
    else:
        model = backbone
        adapter = AdapterSetModule(adapter_config_for(cfg), backbone.dims).to(backbone.device)
        _init_heads_from_backbone(adapter, backbone)
        adapter.requires_grad_(True)
        params = [p for p in adapter.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = warmup_cosine(optimizer, cfg.steps, warmup=50)
    trained: nn.Module = model if adapter is None else adapter
    start = _resume(checkpoint_dir, trained, optimizer, schedule)
    sample = GroupSampler(data, cfg.group_draw)
    for _ in range(start):  # replay the sampling of the steps already done: a resumed run matches a straight one
        sample(rng, cfg.batch_size)
    step_fn = _retrieval_step if cfg.task == "retrieval" else _answer_step
    losses: list[float] = []
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    started = time.monotonic()
    with tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"{cfg.task}/{cfg.mode}") as bar:
        for step in range(start, cfg.steps):
            batch = sample(rng, cfg.batch_size)
            routing = Routing.single(adapter, len(batch))
            loss = step_fn(model, tokenizer, batch, routing, size, cfg)
            losses.append(optimize(loss, optimizer, schedule, params))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if checkpoint_dir is not None and (step + 1) % cfg.checkpoint_every == 0:
                _checkpoint(checkpoint_dir, trained, optimizer, schedule, step + 1, cfg)
                if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                    break
    if adapter is not None:
        adapter.requires_grad_(False)
        adapter.eval()
    model.requires_grad_(False)
    return TrainResult(model, adapter, losses, sum(p.numel() for p in params))


class GroupSampler:
    """Random training batches. An item with a `group` (ImageText.group) brings `per_group` - 1 other members of
    its group into the batch, so the in-batch negatives of ITC and ITM include the items hardest to tell apart
    (the demo: scenes with the same shapes and colours in another layout); data without groups, or per_group 1,
    samples plainly (the same draws as `rng.randrange(len(data))` n times)."""

    def __init__(self, data: Sequence[Any], per_group: int = 2) -> None:
        self.data = data
        self.per_group = per_group
        self.groups: dict[str, list[int]] = {}
        for i, item in enumerate(data):
            if getattr(item, "group", ""):
                self.groups.setdefault(item.group, []).append(i)

    def indices(self, rng: random.Random, n: int) -> list[int]:
        """n indices into the data: uniform draws, each followed by up to per_group - 1 others of its group."""
        picked: list[int] = []
        while len(picked) < n:
            i = rng.randrange(len(self.data))
            picked.append(i)
            others = [j for j in self.groups.get(getattr(self.data[i], "group", ""), []) if j != i]
            wanted = min(self.per_group - 1, len(others), n - len(picked))
            if wanted > 0:
                picked += rng.sample(others, wanted)
        return picked

    def __call__(self, rng: random.Random, n: int) -> list[Any]:
        """n items, each with the caption it trains on (retrieval) fixed by the same generator."""
        batch = []
        for i in self.indices(rng, n):
            item = self.data[i]
            if isinstance(item, ImageText):
                item = ImageText(item.image, [rng.choice(item.captions)], item.key, item.group)
            batch.append(item)
        return batch


def _retrieval_step(model: BlipBackbone, tok: BlipTokenizer, batch: Sequence[Any], routing: Routing, size: int,
                    cfg: TrainConfig) -> torch.Tensor:
    items: list[ImageText] = list(batch)
    captions = [clean_text(it.captions[0], 30) for it in items]
    image_feat, states = visual(model, [it.image for it in items], routing, size, cfg.num_frames)
    ids, mask = tok.encode(captions, mode="text")
    ids, mask = ids.to(model.device), mask.to(model.device)
    keys = [it.key or c for it, c in zip(items, captions, strict=True)]
    same = torch.tensor([[a == b for b in keys] for a in keys], device=model.device)
    text_feat = model.text_features(ids, mask, routing)
    loss = itc_loss(image_feat, text_feat, same)
    return loss + itm_loss(model, states, ids, mask, image_feat.detach(), text_feat.detach(), same, routing,
                           tok.enc_id)


def _answer_step(model: BlipBackbone, tok: BlipTokenizer, batch: Sequence[Any], routing: Routing, size: int,
                 cfg: TrainConfig) -> torch.Tensor:
    qas: list[QA] = list(batch)
    _, states = visual(model, [q.media for q in qas], routing, size, cfg.num_frames)
    q_ids, q_mask = tok.encode([clean_text(q.question, 50) for q in qas], mode="multimodal")
    q_ids, q_mask = q_ids.to(model.device), q_mask.to(model.device)
    question = model.encode_multimodal(q_ids, q_mask, states, None, routing)
    a_ids, a_mask = tok.encode_answers([q.best for q in qas])
    return lm_loss(model, a_ids.to(model.device), a_mask.to(model.device), question, q_mask, routing, tok.dec_id,
                   cfg.label_smoothing)


def trained_from(backbone: BlipBackbone, cfg: TrainConfig, weights: str | Path) -> tuple[BlipBackbone, Any]:
    """A finished run of `cfg` rebuilt from its trained weights (a checkpoint's `weights.safetensors`): the
    (model, adapter) that `train` returned, to evaluate again without training again."""
    state = load_file(str(weights))
    if cfg.mode == "full" or (cfg.mode == "heads" and cfg.task != "retrieval"):
        model = copy.deepcopy(backbone)
        model.load_state_dict(state)
        model.requires_grad_(False)
        return model, None
    adapter = AdapterSetModule(adapter_config_for(cfg), backbone.dims).to(backbone.device)
    adapter.load_state_dict(state)
    adapter.requires_grad_(False)
    adapter.eval()
    return backbone, adapter


def _checkpoint(folder: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                schedule: Any, step: int, cfg: TrainConfig) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(folder / "weights.tmp"))
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                "config": asdict(cfg), "torch_rng": torch.get_rng_state()}, folder / "state.tmp")
    (folder / "weights.tmp").replace(folder / "weights.safetensors")
    (folder / "state.tmp").replace(folder / "state.pt")


def _resume(folder: str | Path | None, module: nn.Module, optimizer: torch.optim.Optimizer,
            schedule: Any) -> int:
    if folder is None or not (Path(folder) / "state.pt").is_file():
        return 0
    folder = Path(folder)
    module.load_state_dict(load_file(str(folder / "weights.safetensors")))
    state = torch.load(folder / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(state["torch_rng"])
    log.info("resumed from %s at step %d", folder, state["step"])
    return int(state["step"])


def freeze_check(backbone: BlipBackbone) -> Callable[[], bool]:
    """A snapshot of every backbone tensor; call the result to check none changed (bit-identical)."""
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    return lambda: all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
