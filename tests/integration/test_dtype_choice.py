"""The compute dtype the server picked, and why, in /readyz?verbose=true (the session server: blip-tiny,
DTYPE=auto on the CPU, so the choice was timed at start; which way it went depends on the machine, so this checks
that the evidence shown is the evidence decided on)."""

from __future__ import annotations

from uniadapter_serve.service.runtime import BF16_MIN_SPEEDUP, PROBE_MIN_ROUNDS


def test_readyz_verbose_shows_the_timed_dtype_choice(admin):
    backbone = admin.get("/readyz", params={"verbose": "true"}).json()["details"]["backbone"]
    choice = backbone["dtype_choice"]
    assert choice["setting"] == "auto" and choice["dtype"] == backbone["dtype"]
    measured = choice["measured"]
    assert measured["images"] == [1, 8] and measured["rounds"] >= PROBE_MIN_ROUNDS
    assert len(measured["float32_cpu_ms"]) == len(measured["bfloat16_cpu_ms"]) == 2
    assert all(t > 0 for t in measured["float32_cpu_ms"] + measured["bfloat16_cpu_ms"])
    faster = min(measured["speedup"]) >= BF16_MIN_SPEEDUP
    assert choice["dtype"] == ("bfloat16" if faster else "float32"), choice
    assert backbone["precision"] == choice["dtype"] and "vit_bf16_from" not in choice  # VIT_BF16_FROM unset: off
