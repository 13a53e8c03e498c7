"""`uniadapter verify`, `adapters record`, `adapters publish` and the golden record in `adapters inspect`, run
in-process through `service.cli.main`: on the shipped demo (fp32 CPU records) and on a random blip-tiny backbone
with random sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from uniadapter_serve.adapters.format import BackboneInfo, read_adapter_meta, save_adapter_set
from uniadapter_serve.adapters.golden import GOLDEN_FILE, GoldenRecord, backbone_fingerprint
from uniadapter_serve.model.loading import random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.service import verify_tool
from uniadapter_serve.service.cli import main

DEMO_SETS = ("demo-retrieval", "demo-vqa", "demo-videoqa")
SETTINGS_ENV = ("BACKBONE", "DATA_ROOT", "ADAPTERS_ROOT", "DEVICE", "DTYPE", "DEMO_CONTENT", "GOLDEN_REQUIRED",
                "ANSWER_LIST", "TORCH_THREADS", "MAX_BATCH_SIZE", "RANK_K")

pytestmark = pytest.mark.skipif(not verify_tool._shipped(), reason="the demo sets are not in the package")


@pytest.fixture(autouse=True)
def _server_defaults(monkeypatch, tmp_path):
    """The settings' defaults (no UNIADAPTER_* from the caller's shell) and an empty working folder, where the
    default data root ("data") would be."""
    for name in SETTINGS_ENV:
        monkeypatch.delenv(f"UNIADAPTER_{name}", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)


def verify_json(capsys, *args: str) -> tuple[int, dict]:
    code = main(["verify", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def by_subject(report: dict) -> dict[str, dict]:
    return {row["subject"]: row for row in report["rows"]}


# -- the demo ---------------------------------------------------------------------------------------------------

def test_verify_with_no_arguments_checks_the_demo_backbone_and_its_three_sets(capsys, tmp_path):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["subject", "recorded", "on"]
    refs = [f"{name}@{read_adapter_meta(verify_tool.SHIPPED_SETS / name / 'v1').version}" for name in DEMO_SETS]
    table = {line.split()[0]: line for line in lines[1:] if line.strip() and not line.startswith("verify:")}
    for subject in ("backbone", *refs):
        assert subject in table, out
        assert table[subject].split()[1:3] == ["cpu/float32", "cpu/float32"], table[subject]
        assert table[subject].rstrip().endswith("pass"), table[subject]
    mixed = [line for line in lines if line.startswith("mixed batch:")]
    assert [line.split()[2] for line in mixed] == ["vision", "text", "itm", "answer"]
    assert all(line.rstrip().endswith("pass") for line in mixed), mixed
    assert "verify: 8 pass on cpu/float32 (backbone demo): ok" in out
    assert not (tmp_path / "work" / "data").exists()  # nothing written: the demo's records are beside it


def test_bfloat16_on_the_cpu_passes_the_float32_demo_records(capsys):
    code, report = verify_json(capsys, "--dtype", "bfloat16")
    assert code == 0 and report["ok"] and report["on"] == "cpu/bfloat16", report
    rows = by_subject(report)
    assert len(rows) == 8 and all(r["result"] == "pass" for r in rows.values()), rows
    checked = [r for r in rows.values() if not r["subject"].startswith("mixed batch")]
    assert {(r["recorded"], r["checked"]) for r in checked} == {("cpu/float32", "cpu/bfloat16")}
    # the tolerance of each comparison is float32's + bfloat16's, and bf16 moves the answers measurably
    assert all(r["compared"] > 0 for r in rows.values())
    assert any(float(r["worst"].split()[1]) > 0 for r in checked)


@pytest.fixture
def tampered(tmp_path) -> Path:
    """An adapters root with copies of the demo sets, demo-vqa's record edited: one answer score + 1.0."""
    root = tmp_path / "adapters"
    for name in DEMO_SETS:
        shutil.copytree(verify_tool.SHIPPED_SETS / name / "v1", root / name / "v1")
    path = root / "demo-vqa" / "v1" / GOLDEN_FILE
    record = json.loads(path.read_text())
    record["probes"]["answer_scores"]["values"][1][0] += 1.0
    path.write_text(json.dumps(record))
    return root


def test_a_tampered_record_fails_and_the_output_names_its_probe(tampered, capsys):
    assert main(["verify", "--adapters-dir", str(tampered)]) == 1
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("demo-vqa@") and "does not" not in line]
    assert "answer_scores[1]" in row and row.rstrip().endswith("mismatch"), row
    (note,) = [line for line in out.splitlines() if line.startswith("demo-vqa@") and "does not reproduce" in line]
    assert "probe answer_scores[1] differs by 1" in note, note
    assert "FAILED" in out.splitlines()[-1]
    for name in ("demo-retrieval", "demo-videoqa"):  # the others still pass
        (line,) = [line for line in out.splitlines() if line.startswith(f"{name}@") and "does not" not in line]
        assert line.rstrip().endswith("pass"), line


def test_adapter_refs_check_only_those_sets(tampered, capsys):
    code, report = verify_json(capsys, "--adapters-dir", str(tampered), "--adapter", "demo-retrieval")
    assert code == 0, report
    sets = [s for s in by_subject(report) if s.startswith("demo-")]
    assert len(sets) == 1 and sets[0].startswith("demo-retrieval@")
    assert main(["verify", "--adapters-dir", str(tampered), "--adapter", "nope"]) == 2
    assert "no adapter set named 'nope'" in capsys.readouterr().err


def test_inspect_shows_the_demo_record_and_verifies_it(tampered, capsys):
    folder = verify_tool.SHIPPED_SETS / "demo-vqa" / "v1"
    assert main(["adapters", "inspect", str(folder), "--backbone", "demo"]) == 0
    out = capsys.readouterr().out
    size = (folder / GOLDEN_FILE).stat().st_size
    assert "golden        recorded on cpu/float32" in out and f"{size:,} bytes" in out, out
    assert "probes        answer_scores 2x8, greedy 2 answers" in out, out
    assert "verified      yes on cpu/float32" in out, out
    assert main(["adapters", "inspect", str(tampered / "demo-vqa" / "v1"), "--backbone", "demo", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["golden"]["bytes"] == (tampered / "demo-vqa" / "v1" / GOLDEN_FILE).stat().st_size
    assert report["verified"]["result"] == "mismatch" and "answer_scores[1]" in report["verified"]["detail"]


# -- a random backbone: record, verify, publish --------------------------------------------------------------

@pytest.fixture
def tiny_sets(tmp_path) -> Path:
    """An adapters root with a retrieval set and a VQA set (own answer list) for `blip-tiny` (the bundled config's
    random backbone, seed 0: what `--backbone blip-tiny` loads)."""
    backbone = random_backbone("blip-tiny")
    info = BackboneInfo.of(backbone)
    root = tmp_path / "tiny"
    save_adapter_set(random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8), seed=81),
                     root / "tiny-ret", name="tiny-ret", backbone=info)
    save_adapter_set(random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=2), seed=82),
                     root / "tiny-vqa", name="tiny-vqa", backbone=info, answer_list=["red", "blue", "two", "left"])
    return root


TINY = ["--backbone", "blip-tiny"]


def test_record_then_verify_round_trip(tiny_sets, tmp_path, capsys):
    for name in ("tiny-ret", "tiny-vqa"):
        assert main(["adapters", "record", str(tiny_sets / name), *TINY]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["path"] == str(tiny_sets / name / GOLDEN_FILE) and report["device"] == "cpu"
        assert report["bytes"] == (tiny_sets / name / GOLDEN_FILE).stat().st_size < 8192
    assert set(report["probes"]) == {"answer_scores", "greedy"} and report["probes"]["answer_scores"] == "2x4"

    data = tmp_path / "data"
    args = ["verify", *TINY, "--adapters-dir", str(tiny_sets), "--data-root", str(data)]
    code, report = verify_json(capsys, *args[1:])
    rows = by_subject(report)
    assert code == 0, rows
    assert rows["backbone"]["result"] == "unrecorded" and not data.exists()  # nothing written without --record
    sets = {s.split("@")[0]: r for s, r in rows.items() if s.startswith("tiny-")}
    assert {n: r["result"] for n, r in sets.items()} == {"tiny-ret": "pass", "tiny-vqa": "pass"}
    assert {s for s in rows if s.startswith("mixed")} == {f"mixed batch: {s}" for s in ("vision", "text", "itm",
                                                                                          "answer")}
    assert main([*args, "--strict"]) == 1  # an unrecorded backbone fails a strict check
    capsys.readouterr()

    code, report = verify_json(capsys, *args[1:], "--record")
    assert code == 0 and by_subject(report)["backbone"]["result"] == "recorded"
    fingerprint = backbone_fingerprint(random_backbone("blip-tiny"))
    assert (data / "golden" / f"backbone-{fingerprint}.json").is_file()
    code, report = verify_json(capsys, *args[1:], "--strict")
    assert code == 0 and by_subject(report)["backbone"]["result"] == "pass", report


def test_record_refuses_to_overwrite_without_force(tiny_sets, capsys):
    folder = tiny_sets / "tiny-ret"
    assert main(["adapters", "record", str(folder), *TINY]) == 0
    first = (folder / GOLDEN_FILE).read_bytes()
    capsys.readouterr()
    assert main(["adapters", "record", str(folder), *TINY]) == 2
    assert "exists (recorded on cpu/float32" in capsys.readouterr().err and (folder / GOLDEN_FILE).read_bytes() == first
    assert main(["adapters", "record", str(folder), *TINY, "--force"]) == 0
    # the same probes on the same backbone, device and dtype: the same record (only its time differs)
    assert json.loads(capsys.readouterr().out)["digest"] == GoldenRecord.from_json(first).digest


def test_record_a_backbone_folder(tiny_sets, tmp_path, capsys):
    from safetensors.torch import save_file

    backbone = random_backbone("blip-tiny")
    folder = tmp_path / "bb"
    folder.mkdir()
    backbone.config.to_json_file(folder / "config.json")
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(folder / "model.safetensors"))
    assert main(["adapters", "record", str(folder), "--backbone-record"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["subject"] == "backbone" and "image_states" in report["probes"]
    code, verified = verify_json(capsys, "--backbone", str(folder), "--adapters-dir", str(tmp_path / "none"))
    assert code == 0 and by_subject(verified)["backbone"]["result"] == "pass"
    assert by_subject(verified)["backbone"]["recorded"] == "cpu/float32"
    assert main(["adapters", "record", str(folder), "--backbone-record", *TINY]) == 2
    assert "leave out --backbone" in capsys.readouterr().err


def test_a_mixed_batch_routed_wrong_is_caught(tiny_sets, capsys, monkeypatch):
    """Every row of a batch routed to the first set (the bug class of a stale adapter index): the sets' own
    records still pass (they run alone), the mixed batch does not."""
    for name in ("tiny-ret", "tiny-vqa"):
        assert main(["adapters", "record", str(tiny_sets / name), *TINY]) == 0
    capsys.readouterr()

    def first_set_for_all(adapters, device=None):
        first = next(a for a in adapters if a is not None)
        return Routing.single(first, len(adapters))

    monkeypatch.setattr(verify_tool.Routing, "per_sample", staticmethod(first_set_for_all))
    code, report = verify_json(capsys, *TINY, "--adapters-dir", str(tiny_sets))
    rows = by_subject(report)
    assert code == 1
    assert rows["mixed batch: vision"]["result"] == "mismatch"
    assert "row 0 (bare image) differs from its result alone" in rows["mixed batch: vision"]["detail"]
    assert all(r["result"] == "pass" for s, r in rows.items() if s.startswith("tiny-"))


def test_publish_writes_a_record_or_verifies_the_one_it_has(tiny_sets, tmp_path, capsys):
    source = tiny_sets / "tiny-ret"
    target = tmp_path / "published"
    assert main(["adapters", "publish", str(source), "--adapters-dir", str(target), *TINY]) == 0
    report = json.loads(capsys.readouterr().out)
    version = read_adapter_meta(source).version
    assert report["ref"] == f"tiny-ret@{version}" and report["golden"] == "recorded on cpu/float32"
    assert (target / "tiny-ret" / version / GOLDEN_FILE).is_file() and not (source / GOLDEN_FILE).exists()

    vqa = tiny_sets / "tiny-vqa"
    assert main(["adapters", "record", str(vqa), *TINY]) == 0
    capsys.readouterr()
    assert main(["adapters", "publish", str(vqa), "--adapters-dir", str(target), *TINY]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["golden"].startswith("verified on cpu/float32")
    assert (target / "tiny-vqa" / read_adapter_meta(vqa).version / GOLDEN_FILE).read_bytes() == (
        vqa / GOLDEN_FILE).read_bytes()

    record = json.loads((vqa / GOLDEN_FILE).read_text())
    record["probes"]["greedy"]["scores"][0] += 1.0
    (vqa / GOLDEN_FILE).write_text(json.dumps(record))
    other = tmp_path / "other"
    assert main(["adapters", "publish", str(vqa), "--adapters-dir", str(other), *TINY]) == 2
    assert "probe greedy[0] differs by 1" in capsys.readouterr().err and not other.exists()


def test_inspect_without_a_record_says_how_to_write_one(tiny_sets, capsys):
    assert main(["adapters", "inspect", str(tiny_sets / "tiny-ret")]) == 0
    assert "golden        none (the set serves unverified; `uniadapter adapters record" in capsys.readouterr().out
