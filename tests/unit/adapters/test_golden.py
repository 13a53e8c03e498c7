"""Golden records on their own: probes are deterministic, records round-trip and are strictly read, comparisons
catch changes beyond the dtypes' tolerance and forgive near-tied greedy tokens, and the verifier remembers what it
checked, refuses what fails, and never lets a read-only data root stop a start."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from uniadapter_serve.adapters.format import BackboneInfo
from uniadapter_serve.adapters.golden import (
    GOLDEN_FILE,
    GoldenRecord,
    Prober,
    compare,
    probe_images,
    read_record,
    sketch,
    tolerance,
    write_record,
)
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.adapters.verification import Verifier
from uniadapter_serve.errors import GoldenMismatchError, GoldenRecordError
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.tokenizer import BlipTokenizer
from uniadapter_serve.model.uniadapter import UniAdapterConfig

ANSWERS = ["red", "blue", "green", "yes", "no"]


@pytest.fixture
def prober(backbone):
    return Prober(backbone.eval(), BlipTokenizer.demo(backbone.config.text_config.vocab_size), ANSWERS)


@pytest.fixture
def vqa_set(backbone):
    return random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), seed=5)


def test_probes_are_the_same_every_time_and_records_are_small(prober, vqa_set):
    assert torch.equal(probe_images(32), probe_images(32))
    a, b = prober.record(vqa_set, ref="v@1"), prober.record(vqa_set, ref="v@1")
    assert a.probes == b.probes and a.digest == b.digest
    assert set(a.probes) == {"answer_scores", "greedy"}
    assert a.probes["answer_scores"]["answers"] == ANSWERS
    assert len(a.to_json()) < 4096
    bare = prober.record()
    assert {"image_states", "image_itc", "text_itc", "itm", "answer_scores", "greedy"} <= set(bare.probes)


def test_a_sketch_moves_no_more_than_the_vector():
    g = torch.Generator().manual_seed(1)
    v = torch.nn.functional.normalize(torch.randn(4, 256, generator=g), dim=-1)
    w = torch.nn.functional.normalize(v + 0.01 * torch.randn(4, 256, generator=g), dim=-1)
    moved = (torch.tensor(sketch(v)) - torch.tensor(sketch(w))).abs().max(dim=1).values
    assert (moved <= (v - w).norm(dim=1) + 1e-6).all() and (moved > 0).all()


def test_a_record_round_trips_and_a_changed_value_is_caught(prober, vqa_set, tmp_path):
    record = prober.record(vqa_set, ref="v@1")
    write_record(tmp_path, record)
    again = read_record(tmp_path)
    assert again is not None and again.probes == record.probes and again.digest == record.digest
    assert compare("v", again, record, prober.tokenizer).ok
    changed = json.loads(record.to_json())
    changed["probes"]["answer_scores"]["values"][1][3] += 0.05  # past float32's tolerance, inside bfloat16's
    edited = GoldenRecord.from_json(json.dumps(changed).encode())
    verdict = compare("v", edited, record, prober.tokenizer)
    assert not verdict.ok and verdict.first_failure.probe == "answer_scores[1]"
    assert "answer_scores[1]" in verdict.message() and "tolerance" in verdict.message()
    with pytest.raises(GoldenMismatchError, match=r"answer_scores\[1\]"):
        verdict.raise_for_mismatch()
    as_bf16 = dataclasses.replace(record, dtype="bfloat16")  # the same numbers, claimed computed in bfloat16
    assert compare("v", edited, as_bf16, prober.tokenizer).ok


def test_tolerances_add_up_across_dtypes_and_cuda_float32_counts_as_tf32():
    assert tolerance("unit", "float32", "cpu") < tolerance("unit", "float16", "cpu") < tolerance("unit", "bfloat16",
                                                                                                  "cpu")
    assert tolerance("unit", "float32", "cuda:0") == tolerance("unit", "float16", "cpu")


def greedy_record(text: str, ids: list[int], margins: list[float]) -> GoldenRecord:
    probe = {"kind": "text", "texts": [text], "scores": [-1.0], "ids": [ids], "margins": [margins]}
    return GoldenRecord("set", "v@1", "cpu", "float32", "fp", {"greedy": probe})


def test_a_different_greedy_answer_passes_only_at_a_near_tie(prober):
    tok = prober.tokenizer
    red, blue = (tok.encode_answers([w])[0][0].tolist() for w in ("red", "blue"))
    now = greedy_record("blue", blue, [0.1, 5.0])
    near_tie = greedy_record("red", red, [1e-3, 5.0])  # the record's winner led by 0.001 at the first token
    assert compare("v", near_tie, now, tok).ok
    clear = greedy_record("red", red, [2.5, 5.0])
    verdict = compare("v", clear, now, tok)
    assert not verdict.ok and "answered 'blue', recorded 'red'" in verdict.first_failure.note


@pytest.mark.parametrize("body", [
    b"", b"{", b"[" * 20_000, b"x" * 70_000, b'{"format": 2}', b'{"format": 1, "subject": "set"}',
    json.dumps({"format": 1, "subject": "set", "device": "cpu", "dtype": "float32", "backbone": "f",
                "probes": {"secrets": {"kind": "unit", "values": [[1.0]]}}}).encode(),
    json.dumps({"format": 1, "subject": "set", "device": "cpu", "dtype": "float32", "backbone": "f",
                "probes": {"itm": {"kind": "logit", "values": [[float("nan")]]}}}).encode(),
    json.dumps({"format": 1, "subject": "set", "device": "cpu", "dtype": "float32", "backbone": "f",
                "probes": {"itm": {"kind": "logit", "values": [[1.0]] * 17}}}).encode(),
    json.dumps({"format": 1, "subject": "set", "device": "cpu", "dtype": "float32", "backbone": "f",
                "probes": {"greedy": {"kind": "text", "texts": ["a"], "scores": [1.0], "ids": [["x"]],
                                      "margins": [[1.0]]}}}).encode(),
    json.dumps({"format": 1, "subject": "set", "device": "cpu", "dtype": "float32", "backbone": "f",
                "probes": {"answer_scores": {"kind": "logp", "values": [[1.0, 2.0]]}}}).encode(),
    json.dumps({"format": 1, "subject": "set", "device": "cpu", "dtype": "float32", "backbone": "f",
                "probes": {"answer_scores": {"kind": "logp", "answers": ["a"], "values": [[1.0, 2.0]]}}}).encode(),
    b'{"format": 1, "subject": "set", "device": "cpu", "dtype": "float32", "backbone": "f", "probes": '
    b'{"answer_scores": {"kind": "logp", "answers": ["\\ud800"], "values": [[1.0]]}}}',
], ids=["empty", "truncated", "deep", "huge", "format", "fields", "unknown-probe", "nan", "rows", "ids",
        "no-answers", "answers-vs-values", "lone-surrogate"])
def test_a_malformed_record_is_refused_by_name(body, tmp_path):
    (tmp_path / GOLDEN_FILE).write_bytes(body)
    with pytest.raises(GoldenRecordError, match=GOLDEN_FILE):
        read_record(tmp_path)


@pytest.fixture
def recorded(backbone, prober, tmp_path):
    """A registry with one retrieval set 'r' and its record, and one 'bare' set without."""
    registry = AdapterRegistry(tmp_path / "adapters")
    module = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4), seed=9)
    registry.publish(module, "r", BackboneInfo.of(backbone),
                     golden=lambda meta: prober.record(module, ref=meta.ref))
    registry.publish(random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8), seed=10), "bare",
                     BackboneInfo.of(backbone))
    return registry


def manager_with(backbone, registry, verifier) -> AdapterManager:
    return AdapterManager(backbone, registry, device_budget_bytes=1 << 20, cpu_budget_bytes=0,
                          verify=verifier.check_set)


def test_the_verifier_remembers_passes_and_refusals(backbone, prober, recorded):
    calls: list[str | None] = []
    real = prober.record
    prober.record = lambda *a, **k: calls.append(k.get("ref")) or real(*a, **k)  # type: ignore[method-assign]
    verifier = Verifier(prober)
    manager = manager_with(backbone, recorded, verifier)
    for _ in range(3):  # the CPU tier holds nothing: each load after an unload reads the disk again
        manager.load("r")
        manager.unload("r")
    assert len(calls) == 1 and verifier.counts[("set", "pass")] == 1
    manager.load("bare")
    assert verifier.table()[recorded.resolve("bare").ref]["result"] == "unrecorded"
    folder = recorded.resolve("r").path
    doc = json.loads((folder / GOLDEN_FILE).read_text())
    doc["probes"]["itm"]["values"][0][1] += 0.5
    (folder / GOLDEN_FILE).write_text(json.dumps(doc))  # another record: checked again, and refused
    for _ in range(2):
        with pytest.raises(GoldenMismatchError, match=r"itm\[0\]"):
            manager.load("r")
    assert len(calls) == 2 and "r@" not in " ".join(manager.resident())


def test_required_records_and_records_of_another_version(backbone, prober, recorded):
    strict = manager_with(backbone, recorded, Verifier(prober, required=True))
    with pytest.raises(GoldenMismatchError, match=r"has no golden\.json"):
        strict.load("bare")
    other = recorded.resolve("r").path / GOLDEN_FILE
    doc = json.loads(other.read_text())
    doc["ref"] = "r@000000000000"
    other.write_text(json.dumps(doc))
    with pytest.raises(GoldenMismatchError, match="not of version"):
        manager_with(backbone, recorded, Verifier(prober)).load("r")


def test_the_backbone_is_recorded_once_then_verified(prober, tmp_path):
    verifier = Verifier(prober)
    first = verifier.check_backbone(None, tmp_path)
    assert first.result == "recorded" and len(list((tmp_path / "golden").iterdir())) == 1
    assert Verifier(prober).check_backbone(None, tmp_path).result == "pass"
    (tmp_path / "elsewhere").mkdir()
    write_record(tmp_path / "elsewhere", dataclasses.replace(prober.record(), probes={
        **prober.record().probes, "itm": {"kind": "logit", "values": [[9.0, 9.0], [9.0, 9.0]]}}))
    beside = Verifier(prober).check_backbone(tmp_path / "elsewhere", tmp_path)  # the record beside it wins
    assert beside.result == "mismatch" and "itm[" in beside.detail


def test_a_data_root_that_cannot_hold_a_record_does_not_stop_a_start(prober, tmp_path):
    (tmp_path / "golden").write_text("a file where the folder would go")
    outcome = Verifier(prober).check_backbone(None, tmp_path)
    assert outcome.result == "unrecorded" and "none can be written" in outcome.detail, outcome


def test_each_shipped_set_moves_its_probes_well_past_the_bfloat16_tolerance():
    """A record is only worth checking if serving the bare backbone instead of the set (the routing bug the checks
    exist for) would fail it: each shipped set's effect on every probe it shares with the bare backbone's record is
    over twice the float32 + bfloat16 tolerance."""
    from uniadapter_serve.adapters.golden import answer_tokens
    from uniadapter_serve.adapters.verification import find_backbone_record
    from uniadapter_serve.model.loading import DEMO_DIR, load_backbone
    from uniadapter_serve.model.tokenizer import load_tokenizer
    from uniadapter_serve.service.demo import DEMO_SETS, SETS_DIR

    backbone = load_backbone("demo")
    tokenizer = load_tokenizer("demo", backbone.config)
    bare = find_backbone_record(backbone, DEMO_DIR, DEMO_DIR)
    assert bare is not None
    for name in DEMO_SETS.values():
        record = read_record(SETS_DIR / name / "v1")
        assert record is not None
        shared = [p for p in record.probes if p in bare.probes and p != "greedy"
                  and record.probes[p].get("answers") == bare.probes[p].get("answers")]
        if record.probes.get("answer_scores", {}).get("answers") != bare.probes["answer_scores"]["answers"]:
            shared = [p for p in shared if p != "answer_scores"]
        assert shared or name == "demo-videoqa"  # its probes ask about the clip, the bare record about images
        for probe in shared:
            kind = record.probes[probe]["kind"]
            tol = tolerance(kind, "float32", "cpu") + tolerance(kind, "bfloat16", "cpu")
            scale = [1] * len(record.probes[probe]["values"][0])
            if kind == "logp":
                scale = answer_tokens(tokenizer, record.probes[probe]["answers"])
            effect = max(abs(a - b) / s for w, h in zip(record.probes[probe]["values"], bare.probes[probe]["values"],
                                                        strict=True)
                         for a, b, s in zip(w, h, scale, strict=True))
            assert effect > 2 * tol, f"{name} {probe}: effect {effect:.3g} within 2x the tolerance {tol:.3g}"
