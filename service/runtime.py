"""Resolve device and dtype settings into torch objects.

`DTYPE=auto` on a CPU is decided by timing: `load_served_backbone` loads the backbone in float32, runs the
workload a VQA request makes of it (`measure_bf16`) in float32 and in a bfloat16 copy, and keeps bfloat16 only
where it is clearly faster for this model on this CPU (`decide`), by the process's CPU time. A CPU without native
bf16 multiplies it slowly, and the timing says so: no CPU flags are read. `VIT_BF16_FROM` (explicit, never timed)
runs a float32 ViT's larger batches under bfloat16 autocast (`load_served_backbone`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from transformers import BlipConfig

from uniadapter_serve.errors import ConfigError
from uniadapter_serve.model.backbone import BlipBackbone, text_config, vision_config
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.vqa import generate_answers

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

BF16_MIN_SPEEDUP = 1.2
"""Under DTYPE=auto on a CPU, bfloat16 is kept only when the timed workload runs at least this much faster than in
float32, for one request and for a full batch alike. bf16 costs accuracy margin (answers and rankings stay within
the tests' bounds, but closer to them), so parity is not worth it; and the minimum of a few timed rounds on a busy
machine still moves by ~10 %, so a model near 1.0x must not flip between starts. Both batch sizes, because a
model can win one and lose the other: on this project's 2-core AVX512_BF16 machine the demo's ViT runs 1.6x faster
in bf16 but its small decoder ~1.4x slower (dispatch-bound kernels), so one request is 0.65-0.75x and a full
batch 1.0-1.3x (the demo stays float32); BLIP-base is 2.3-2.5x at both (bfloat16); blip-tiny 0.3-0.6x."""

PROBE_BUDGET_S = 0.25
"""Timed rounds continue until their runs add up to this many seconds of CPU time, after at least
PROBE_MIN_ROUNDS (at most PROBE_MAX_ROUNDS)."""
PROBE_MIN_ROUNDS = 3
PROBE_MAX_ROUNDS = 12
PROBE_LARGE_MACS = 5e9
"""A model whose one-image vision forward is this many multiply-adds or more (BLIP-base at 384 px: 4.9e10; the
demo: 5.1e7) is timed for one round and no warm-up: a round of it takes ~1.5 s on 2 cores, its first calls cost
hardly more than the next (BLIP-base: 702 / 705 ms float32, 295 / 296 ms bfloat16), and more would cost seconds
at every start. Judged from the config, not from a timing, so a busy machine cannot cut a small model's rounds
short."""
PROBE_TOKENS = 600
"""A probe's full batch holds as many images as make about this many patch tokens (BLIP-base at 384 px: 1 image;
the demo at 96 px: 8), at most PROBE_MAX_IMAGES."""
PROBE_MAX_IMAGES = 8
PROBE_QUESTION_TOKENS = 12
PROBE_ANSWER_STEPS = 5
"""greedy decoder steps per probe (a short VQA answer), with the KV cache, as the answer stage decodes"""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a setting names, without timing anything: 'auto' is float16 on CUDA and float32 on a CPU. The
    server resolves 'auto' on a CPU by timing the backbone instead (`load_served_backbone`)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class DtypeTimes:
    """What `measure_bf16` found: the best (minimum) CPU seconds of the probe workload per batch size."""

    images: tuple[int, ...]
    """images per probe batch: one request, then a full batch (one entry where they coincide)"""
    float32_s: tuple[float, ...]
    bfloat16_s: tuple[float, ...]
    rounds: int
    """alternating float32/bfloat16 rounds timed (each round runs every batch size in both dtypes)"""
    elapsed_s: float
    """wall time of the whole measurement, the bfloat16 copy of the weights and the warm-up included"""

    def speedups(self) -> tuple[float, ...]:
        """float32 time / bfloat16 time per batch size (> 1: bfloat16 is faster)."""
        return tuple(f / b if b > 0 else math.inf for f, b in zip(self.float32_s, self.bfloat16_s, strict=True))


@dataclass(frozen=True)
class DtypeChoice:
    """The compute dtype the backbone runs in, and why (shown in /readyz?verbose=true and logged at start)."""

    dtype: torch.dtype
    setting: str
    """the DTYPE setting it came from ('auto' or an explicit name)"""
    reason: str
    times: DtypeTimes | None = None
    """the timing behind an 'auto' choice on a CPU (None where nothing was timed)"""
    vit_bf16_from: int | None = None
    """VIT_BF16_FROM where it applies (a float32 backbone on a CPU): its ViT runs batches of at least this many
    frames under bfloat16 autocast (`VisionModel.bf16_from`); None: the ViT computes in `dtype`"""

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": dtype_name(self.dtype), "setting": self.setting, "reason": self.reason}
        if self.times is not None:
            t = self.times
            out["measured"] = {
                "images": list(t.images),
                "float32_cpu_ms": [round(s * 1e3, 3) for s in t.float32_s],
                "bfloat16_cpu_ms": [round(s * 1e3, 3) for s in t.bfloat16_s],
                "speedup": [round(s, 3) for s in t.speedups()],
                "min_speedup": BF16_MIN_SPEEDUP, "rounds": t.rounds, "threads": torch.get_num_threads(),
                "seconds": round(t.elapsed_s, 3),
            }
        if self.vit_bf16_from is not None:
            out["vit_bf16_from"] = self.vit_bf16_from
        return out


Measure = Callable[[BlipBackbone], DtypeTimes]


def decide(times: DtypeTimes) -> DtypeChoice:
    """bfloat16 where it is at least BF16_MIN_SPEEDUP faster at every timed batch size, else float32."""
    speedups = times.speedups()
    shown = ", ".join(f"{n} image{'s' * (n > 1)}: {s:.2f}x" for n, s in zip(times.images, speedups, strict=True))
    if min(speedups) >= BF16_MIN_SPEEDUP:
        return DtypeChoice(torch.bfloat16, "auto", f"bfloat16 timed faster than float32 ({shown}; needs "
                           f">= {BF16_MIN_SPEEDUP}x at each)", times)
    return DtypeChoice(torch.float32, "auto", f"bfloat16 not clearly faster here ({shown}; needs "
                       f">= {BF16_MIN_SPEEDUP}x at each): float32", times)


def choose_dtype(setting: str, device: torch.device, backbone: BlipBackbone | None = None,
                 measure: Measure | None = None) -> DtypeChoice:
    """The dtype for `setting` on `device`. An explicit name always wins; 'auto' is float16 on CUDA and, on a
    CPU, `decide` on `measure(backbone)` (default `measure_bf16`; `backbone` in float32)."""
    if setting != "auto":
        return DtypeChoice(resolve_dtype(setting, device), setting, f"DTYPE={setting} (explicit)")
    if device.type != "cpu":
        return DtypeChoice(resolve_dtype(setting, device), setting, f"auto on {device.type}: float16")
    if backbone is None or backbone.dtype != torch.float32:
        raise ValueError("DTYPE=auto on a CPU is decided on the backbone loaded in float32")
    try:
        times = (measure or measure_bf16)(backbone)
    except RuntimeError as e:  # a torch build without CPU bf16 kernels for an op: bf16 cannot serve here
        return DtypeChoice(torch.float32, setting, f"bfloat16 failed to run here ({e}): float32")
    return decide(times)


def load_served_backbone(source: str | Path | BlipConfig, device: torch.device, setting: str,
                         measure: Measure | None = None,
                         vit_bf16_from: int | None = None) -> tuple[BlipBackbone, DtypeChoice]:
    """`load_backbone(source)` on `device` in the dtype `setting` resolves to (see `choose_dtype`). Under 'auto' on
    a CPU the backbone is loaded in float32, timed, and cast only if bfloat16 wins; its fingerprints are those of
    the weights as loaded, whatever the cast."""
    if setting == "auto" and device.type == "cpu":
        backbone = load_backbone(source, device=device, dtype=torch.float32)
        choice = choose_dtype(setting, device, backbone, measure)
        if choice.dtype != torch.float32:
            backbone.to(dtype=choice.dtype)
    else:
        choice = choose_dtype(setting, device)
        backbone = load_backbone(source, device=device, dtype=choice.dtype)
    log.info("backbone dtype %s (DTYPE=%s): %s", dtype_name(choice.dtype), setting, choice.reason)
    if vit_bf16_from is not None and backbone.dtype == torch.float32 and device.type == "cpu":
        backbone.vision_model.bf16_from = vit_bf16_from
        choice = replace(choice, vit_bf16_from=vit_bf16_from)
        log.info("backbone ViT: batches of %d frames or more under bfloat16 autocast (VIT_BF16_FROM)", vit_bf16_from)
    return backbone, choice


class _Workload(nn.Module):
    """What one VQA generate batch asks of the backbone: images through the vision encoder, the question through
    the text encoder cross-attending to them, PROBE_ANSWER_STEPS greedy decoder steps. Called through
    `functional_call`, so the bfloat16 run uses a copy of the weights, never the served ones."""

    def __init__(self, backbone: BlipBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # pixels: (B, 3, S, S); ids, mask: (B, L)
        b = self.backbone
        states = b.encode_image(pixels)  # (B, N, D)
        question = b.encode_multimodal(ids, mask, states)  # (B, L, D)
        if b.text_decoder is None:
            return question
        tc = text_config(b.config)
        # eos -1: never met, so every probe decodes exactly PROBE_ANSWER_STEPS tokens
        answer, _ = generate_answers(b, question, mask, tc.bos_token_id or 0, -1, tc.pad_token_id or 0,
                                     max_length=PROBE_ANSWER_STEPS)
        return answer


def probe_images(config: BlipConfig) -> tuple[int, ...]:
    """Images per probe batch: one request, and a full batch of about PROBE_TOKENS patch tokens."""
    patch = int(vision_config(config).patch_size)  # type: ignore[arg-type]
    tokens = (_image_size(config) // patch) ** 2 + 1
    full = max(1, min(PROBE_MAX_IMAGES, PROBE_TOKENS // tokens))
    return (1,) if full == 1 else (1, full)


def vision_macs(config: BlipConfig) -> float:
    """Multiply-adds of one image through the vision encoder (its linear layers: 12 D^2 per token per layer)."""
    vc = vision_config(config)
    patch = int(vc.patch_size)  # type: ignore[arg-type]
    tokens = (_image_size(config) // patch) ** 2 + 1
    return tokens * 12.0 * int(vc.hidden_size) ** 2 * int(vc.num_hidden_layers)


def _image_size(config: BlipConfig) -> int:
    return int(vision_config(config).image_size)  # type: ignore[arg-type]


@torch.inference_mode()
def measure_bf16(backbone: BlipBackbone, clock: Callable[[], float] = time.process_time) -> DtypeTimes:
    """Time `_Workload` on `backbone` (float32, left as it is) and on a bfloat16 copy of its weights. One untimed
    call in each dtype first, except for a model of PROBE_LARGE_MACS (one-time setup: ~1 s for blip-tiny's first
    call on a busy machine, against 3 ms warm), then rounds that alternate which dtype goes first, each running
    every `probe_images` batch in both, until PROBE_BUDGET_S is spent (at least PROBE_MIN_ROUNDS, one for a model
    of PROBE_LARGE_MACS; at most PROBE_MAX_ROUNDS). The minimum per dtype and batch is kept.

    `clock` is the process's CPU time (all its threads): what a batch costs the machine, which bounds a loaded
    server's throughput, and what other processes cannot inflate. Wall time on a busy 2-core machine compressed
    BLIP-base's 2.3x to 0.4-1.2x (bf16's kernels stall worse when a thread is preempted), so it chose float32 for
    the model that gains the most; CPU time read 2.3x there as on a quiet machine."""
    start = time.perf_counter()
    workload = _Workload(backbone)
    weights = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()}
    size, tc = _image_size(backbone.config), text_config(backbone.config)
    gen = torch.Generator().manual_seed(0)  # the global RNG stays as it was
    images = probe_images(backbone.config)
    least = 1 if vision_macs(backbone.config) >= PROBE_LARGE_MACS else PROBE_MIN_ROUNDS
    inputs = []
    for n in images:
        pixels = torch.randn(n, 3, size, size, generator=gen)
        ids = torch.randint(4, int(tc.vocab_size), (n, PROBE_QUESTION_TOKENS), generator=gen)
        inputs.append(tuple(t.to(backbone.device) for t in (pixels, ids, torch.ones_like(ids))))
    for args in inputs[:1] if least > 1 else []:  # untimed: the first calls' one-time setup (lazy init, kernels)
        workload(*args)
        functional_call(workload, bf16, args)
    best: dict[str, list[float]] = {"float32": [math.inf] * len(images), "bfloat16": [math.inf] * len(images)}
    rounds, spent = 0, 0.0
    while rounds < PROBE_MAX_ROUNDS and not (rounds >= least and spent >= PROBE_BUDGET_S):
        order = ("float32", "bfloat16") if rounds % 2 == 0 else ("bfloat16", "float32")
        for i, args in enumerate(inputs):
            for name in order:
                t0 = clock()
                if name == "float32":
                    workload(*args)
                else:
                    functional_call(workload, bf16, args)
                took = clock() - t0
                best[name][i] = min(best[name][i], took)
                spent += took
        rounds += 1
    return DtypeTimes(images, tuple(best["float32"]), tuple(best["bfloat16"]), rounds, time.perf_counter() - start)
