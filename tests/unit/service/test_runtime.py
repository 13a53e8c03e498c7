"""DTYPE resolution: an explicit setting always wins; 'auto' on a CPU keeps bfloat16 only where the timed workload
is at least BF16_MIN_SPEEDUP faster at every batch size. The timings here are injected (a `measure`, a `clock`):
no test depends on this machine's speed."""

from __future__ import annotations

import itertools

import pytest
import torch

from uniadapter_serve.errors import ConfigError
from uniadapter_serve.model.loading import load_backbone, load_config
from uniadapter_serve.service import runtime
from uniadapter_serve.service.runtime import (
    BF16_MIN_SPEEDUP,
    DtypeTimes,
    choose_dtype,
    decide,
    load_served_backbone,
    measure_bf16,
    probe_images,
)

CPU = torch.device("cpu")


def times(fp32_ms: tuple[float, ...], bf16_ms: tuple[float, ...]) -> DtypeTimes:
    return DtypeTimes((1, 8)[:len(fp32_ms)], tuple(t / 1e3 for t in fp32_ms), tuple(t / 1e3 for t in bf16_ms),
                      rounds=3, elapsed_s=0.2)


def never(backbone):
    raise AssertionError("an explicit DTYPE (or CUDA) must not time anything")


# what this repo's 2-core AVX512_BF16 machine measured (ms, 1 image / 8 images)
BASE = times((1100.0,), (450.0,))  # BLIP-base at 384 px: its full batch is 1 image
TINY = times((1.4, 3.0), (3.0, 6.5))  # blip-tiny: bf16 slower at both
VISION_ONLY_WINS = times((11.7, 49.0), (13.2, 31.0))  # the demo: bf16 faster on a full batch only


@pytest.mark.parametrize(("measured", "expected"), [
    (BASE, torch.bfloat16), (TINY, torch.float32), (VISION_ONLY_WINS, torch.float32),
    (times((1.2, 1.2), (1.0, 1.0)), torch.bfloat16),  # exactly the threshold
    (times((1.19, 2.0), (1.0, 1.0)), torch.float32),
])
def test_auto_keeps_bfloat16_only_where_it_is_clearly_faster_at_every_batch(measured, expected):
    assert BF16_MIN_SPEEDUP == 1.2
    choice = decide(measured)
    assert (choice.dtype, choice.setting) == (expected, "auto")
    assert choice.times is measured and "x" in choice.reason


def test_the_choice_shows_its_evidence():
    shown = decide(BASE).describe()
    assert shown["dtype"] == "bfloat16" and shown["setting"] == "auto"
    assert shown["measured"]["images"] == [1]
    assert shown["measured"]["float32_cpu_ms"] == [1100.0] and shown["measured"]["bfloat16_cpu_ms"] == [450.0]
    assert shown["measured"]["speedup"] == [round(1100 / 450, 3)] and shown["measured"]["min_speedup"] == 1.2
    assert shown["measured"]["rounds"] == 3 and shown["measured"]["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_never_overridden(name):
    choice = choose_dtype(name, CPU, load_backbone("blip-tiny"), measure=never)
    assert choice.dtype == runtime.DTYPES[name] and choice.times is None
    assert choice.describe() == {"dtype": name, "setting": name, "reason": f"DTYPE={name} (explicit)"}
    backbone, loaded = load_served_backbone("blip-tiny", CPU, name, measure=never)
    assert backbone.dtype == runtime.DTYPES[name] and loaded == choice


def test_auto_on_cuda_stays_float16_untimed():
    assert choose_dtype("auto", torch.device("cuda"), measure=never).dtype == torch.float16


def test_an_unknown_dtype_names_the_accepted_ones():
    with pytest.raises(ConfigError, match="bfloat16"):
        choose_dtype("fp8", CPU)


def test_auto_times_the_float32_backbone_only():
    with pytest.raises(ValueError, match="float32"):
        choose_dtype("auto", CPU, load_backbone("blip-tiny", dtype=torch.bfloat16), measure=never)


def test_bfloat16_that_cannot_run_falls_back_to_float32():
    def broken(backbone):
        raise RuntimeError('"addmm_impl_cpu_" not implemented for \'BFloat16\'')

    choice = choose_dtype("auto", CPU, load_backbone("blip-tiny"), measure=broken)
    assert choice.dtype == torch.float32 and "not implemented" in choice.reason


@pytest.mark.parametrize(("measured", "dtype"), [(TINY, torch.float32), (BASE, torch.bfloat16)])
def test_auto_loads_in_float32_and_casts_only_for_bfloat16(measured, dtype):
    reference = load_backbone("blip-tiny")
    seen = []

    def measure(backbone):
        seen.append(backbone.dtype)
        return measured

    backbone, choice = load_served_backbone("blip-tiny", CPU, "auto", measure=measure)
    assert seen == [torch.float32] and choice.dtype == dtype and backbone.dtype == dtype
    assert backbone.fingerprints == reference.fingerprints  # of the weights as loaded: adapter sets still fit
    ref_state = reference.state_dict()
    for key, value in backbone.state_dict().items():
        expected = ref_state[key].to(dtype) if value.is_floating_point() else ref_state[key]
        assert torch.equal(value, expected), key


@pytest.mark.parametrize(("config", "images"), [("blip-base", (1,)), ("blip-tiny", (1, 8))])
def test_a_full_probe_batch_holds_about_600_patch_tokens(config, images):
    assert probe_images(load_config(config)) == images


def test_blip_base_is_timed_as_a_large_model_and_the_demo_is_not():
    from uniadapter_serve.model.loading import source_config

    base = runtime.vision_macs(load_config("blip-base"))
    assert base == pytest.approx(4.9e10, rel=0.01) and base > runtime.PROBE_LARGE_MACS
    assert runtime.vision_macs(source_config("demo")) < runtime.PROBE_LARGE_MACS / 50


def test_the_demo_probes_one_image_and_eight():
    from uniadapter_serve.model.loading import source_config

    assert probe_images(source_config("demo")) == (1, 8)  # 96 px / 12: 65 tokens each


def fake_clock(step: float):
    ticks = itertools.count()
    return lambda: next(ticks) * step


@pytest.mark.parametrize(("step", "large", "rounds"), [
    (0.001, False, runtime.PROBE_MAX_ROUNDS),  # a fast model: the budget fits more than the most rounds
    (0.01, False, 7),  # four runs of one tick a round: the seventh round spends past the 0.25 s budget (0.28 s)
    (0.2, False, runtime.PROBE_MIN_ROUNDS),  # a busy machine does not cut a small model's rounds short
    (0.2, True, 1),  # a model of PROBE_LARGE_MACS stops after one round past the budget
    (0.001, True, runtime.PROBE_MAX_ROUNDS),
])
def test_the_measurement_runs_rounds_by_its_clock_and_leaves_the_backbone_alone(step, large, rounds, monkeypatch):
    if large:
        monkeypatch.setattr(runtime, "PROBE_LARGE_MACS", 0.0)
    backbone = load_backbone("blip-tiny")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    rng = torch.random.get_rng_state()
    measured = measure_bf16(backbone, clock=fake_clock(step))
    assert measured.rounds == rounds and measured.images == (1, 8)
    # each time is one call's pair of ticks, whatever the dtype (the clock is all this test times)
    assert measured.float32_s == pytest.approx((step, step)) and measured.bfloat16_s == pytest.approx((step, step))
    assert torch.equal(torch.random.get_rng_state(), rng)  # its inputs come from a generator of its own
    assert backbone.dtype == torch.float32
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_the_measurement_runs_the_bfloat16_copy_for_real():
    """Timed with the real clock on blip-tiny (no speed asserted): both dtypes ran and took time."""
    measured = measure_bf16(load_backbone("blip-tiny"))
    assert measured.rounds >= runtime.PROBE_MIN_ROUNDS
    assert all(t > 0 for t in (*measured.float32_s, *measured.bfloat16_s))
    assert len(measured.speedups()) == 2


def test_a_backbone_auto_cast_to_bfloat16_serves_float32_unit_embeddings():
    """ITC embeddings are normalised and handed on in float32 whatever the compute dtype (a bf16 norm is off by
    ~4e-3, enough to reorder close search hits)."""
    from uniadapter_serve.model.routing import Routing
    from uniadapter_serve.model.stages import TextInput, VisionInput, make_stages
    from uniadapter_serve.model.tokenizer import load_tokenizer

    served, choice = load_served_backbone("blip-tiny", CPU, "auto", measure=lambda b: BASE)
    reference = load_backbone("blip-tiny")
    assert choice.dtype == served.dtype == torch.bfloat16
    tok = load_tokenizer("blip-tiny", served.config)
    pixels = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    got = {}
    for name, model in (("bf16", served), ("fp32", reference)):
        stages = make_stages(model, tok)
        (image,) = stages["vision"]([VisionInput(pixels)], Routing.none(1))
        (text,) = stages["text"]([TextInput("a red circle")], Routing.none(1))
        got[name] = (image.embedding, text)
    for bf16, fp32 in zip(got["bf16"], got["fp32"], strict=True):
        assert bf16.dtype == torch.float32
        assert float(bf16.norm()) == pytest.approx(1.0, abs=1e-6)
        assert float((bf16 - fp32).abs().max()) < 1e-2  # bf16 compute: measured 3.7e-3 (image), 1.6e-3 (text)


# -- the ViT alone under bfloat16 autocast ---------------------------------------------------------------------

def vision_times(speedups: tuple[float, ...]) -> DtypeTimes:
    frames = runtime.VISION_PROBE_FRAMES[:len(speedups)]
    bf16 = tuple(0.01 * n / s for n, s in zip(frames, speedups, strict=True))
    return DtypeTimes(frames, tuple(0.01 * n for n in frames), bf16, rounds=3, elapsed_s=1.0)


@pytest.mark.parametrize(("speedups", "frames"), [
    ((0.85, 1.0, 1.16, 1.37, 1.36, 1.64), 8),  # what the demo's ViT measured on this repo's 2-core machine
    ((1.3, 1.3, 1.3, 1.3, 1.3, 1.3), 1),
    ((0.6, 0.6, 0.7, 0.8, 0.9, 1.19), None),  # blip-tiny's kind: never
    ((1.5, 1.5, 1.5, 1.5, 1.5, 1.1), None),  # losing at the largest batch: a batch of 32 would run slower
    ((0.9, 1.3, 1.1, 1.3, 1.3, 1.3), 8),  # from the smallest size where it and every larger one win
    ((0.9, 0.9, 0.9, 0.9, 0.9, 1.2), 32),  # exactly the threshold
])
def test_the_vit_autocasts_from_the_batch_where_it_and_every_larger_one_win(speedups, frames):
    float32 = decide(VISION_ONLY_WINS)
    choice = runtime.decide_vision(float32, vision_times(speedups))
    assert choice.dtype == torch.float32 and choice.vision_bf16_from == frames
    assert choice.times is float32.times and choice.vision_times is not None
    shown = choice.describe()["vision"]
    assert shown["bf16_from_frames"] == frames and shown["measured"]["images"] == list(runtime.VISION_PROBE_FRAMES)
    assert shown["measured"]["speedup"] == [round(s, 3) for s in speedups]
    assert ("float32" in shown["reason"]) and (frames is None or f"from {frames} frames" in shown["reason"])


def test_the_vit_is_timed_alone_only_where_float32_was_kept_on_a_small_model_near_parity(monkeypatch):
    timed = []

    def vision(backbone):
        timed.append(backbone.dtype)
        return vision_times((0.85, 1.0, 1.16, 1.37, 1.36, 1.64))

    backbone = load_backbone("blip-tiny")
    choice = choose_dtype("auto", CPU, backbone, measure=lambda b: VISION_ONLY_WINS, measure_vision=vision)
    assert timed == [torch.float32] and choice.vision_bf16_from == 8
    for measured in (BASE, TINY):  # bf16 kept whole; bf16 losing badly even on a full batch (0.46x < the floor)
        choice = choose_dtype("auto", CPU, backbone, measure=lambda b, m=measured: m, measure_vision=never)
        assert choice.vision_bf16_from is None and "vision" not in choice.describe()
    monkeypatch.setattr(runtime, "PROBE_LARGE_MACS", 0.0)  # a large model: its ViT is most of what lost
    choice = choose_dtype("auto", CPU, backbone, measure=lambda b: VISION_ONLY_WINS, measure_vision=never)
    assert choice.vision_bf16_from is None
    assert choose_dtype("float32", CPU, backbone, measure=never, measure_vision=never).vision_bf16_from is None


def test_the_served_backbone_autocasts_its_vit_as_chosen():
    served, choice = load_served_backbone("blip-tiny", CPU, "auto", measure=lambda b: VISION_ONLY_WINS,
                                          measure_vision=lambda b: vision_times((0.9, 0.9, 1.3, 1.3, 1.3, 1.3)))
    assert served.dtype == torch.float32 and served.vision_model.bf16_from == choice.vision_bf16_from == 4
    assert served.precision == "bfloat16"
    explicit, _ = load_served_backbone("blip-tiny", CPU, "float32", measure=never, measure_vision=never)
    assert explicit.vision_model.bf16_from is None and explicit.precision == "float32"


def test_the_vit_measurement_times_per_call_and_leaves_the_backbone_alone(monkeypatch):
    backbone = load_backbone("blip-tiny")
    backbone.vision_model.bf16_from = 7
    seen = []
    real = backbone.encode_image

    def encode(pixels, routing=None):
        seen.append((pixels.shape[0], backbone.vision_model.bf16_from))
        return real(pixels, routing)

    monkeypatch.setattr(backbone, "encode_image", encode)
    monkeypatch.setattr(runtime, "VISION_SAMPLE_S", 0.0)  # one call a sample
    measured = runtime.measure_vision_bf16(backbone, clock=fake_clock(0.01))
    assert measured.images == runtime.VISION_PROBE_FRAMES and measured.rounds >= runtime.PROBE_MIN_ROUNDS
    assert measured.float32_s == pytest.approx((0.01,) * 6) and measured.bfloat16_s == pytest.approx((0.01,) * 6)
    assert {f for _, f in seen} == {None, 1}  # float32, then autocast from one frame on
    assert {n for n, _ in seen} == set(runtime.VISION_PROBE_FRAMES)
    assert backbone.vision_model.bf16_from == 7 and backbone.dtype == torch.float32
    monkeypatch.setattr(runtime, "VISION_SAMPLE_S", 0.05)  # a sample repeats its call to last that long
    again = runtime.measure_vision_bf16(backbone, clock=fake_clock(0.01))
    assert again.float32_s[0] < 0.01  # one frame (~1 ms): one tick of the fake clock over the calls of a sample
