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


# -- VIT_BF16_FROM ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("setting", "measured", "applied"), [
    ("float32", None, True), ("auto", TINY, True),  # a float32 backbone on the CPU: its ViT autocasts from 8 frames
    ("auto", BASE, False), ("bfloat16", None, False),  # bf16 throughout already: nothing to autocast
])
def test_vit_bf16_from_autocasts_a_float32_vit_only(setting, measured, applied):
    backbone, choice = load_served_backbone("blip-tiny", CPU, setting, measure=never if measured is None
                                            else (lambda b: measured), vit_bf16_from=8)
    assert backbone.vision_model.bf16_from == choice.vit_bf16_from == (8 if applied else None)
    assert backbone.precision == ("bfloat16" if applied else runtime.dtype_name(backbone.dtype))
    assert choice.describe().get("vit_bf16_from") == (8 if applied else None)
    plain, unset = load_served_backbone("blip-tiny", CPU, "float32", measure=never)
    assert plain.vision_model.bf16_from is None and unset.vit_bf16_from is None and plain.precision == "float32"


def test_vit_bf16_from_is_a_setting_of_one_or_more():
    from pydantic import ValidationError

    from uniadapter_serve.service.settings import Settings

    assert Settings().vit_bf16_from is None
    assert Settings(vit_bf16_from=16).vit_bf16_from == 16
    with pytest.raises(ValidationError, match="vit_bf16_from"):
        Settings(vit_bf16_from=0)
