"""The demo build writes the shipped backbone folder's tokenizer and preprocessor files byte for byte, whatever
the tokenizer did before it was saved (the build saves it after pre-training), and the shipped golden records."""

from __future__ import annotations

import json
import shutil

from uniadapter_serve.adapters.demo.build import write_golden, write_processing_files
from uniadapter_serve.adapters.golden import GOLDEN_FILE, compare, read_record
from uniadapter_serve.model.demo.shipped import DEMO_ROOT, SET_NAMES
from uniadapter_serve.model.preprocess import PREPROCESSOR_CONFIG
from uniadapter_serve.model.tokenizer import BlipTokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", PREPROCESSOR_CONFIG)


def test_the_build_writes_the_shipped_processing_files(tmp_path):
    tok = BlipTokenizer.demo(512)
    tok.encode(["a used tokenizer", "keeps its last padding and truncation"], max_length=7)
    size = json.loads((DEMO_ROOT / "backbone" / "config.json").read_text())["vision_config"]["image_size"]
    write_processing_files(tok, tmp_path, size)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DEMO_ROOT / "backbone" / name).read_bytes(), name


def test_the_build_writes_the_shipped_golden_records(tmp_path):
    """write_golden (what the build calls after writing the backbone and after each set) on a copy of the shipped
    files gives the shipped records: same subject, ref, backbone fingerprint, device/dtype, probes and answers,
    every number within float32's tolerance (summation order may differ with the thread count)."""
    shutil.copytree(DEMO_ROOT / "backbone", tmp_path / "backbone", ignore=shutil.ignore_patterns(GOLDEN_FILE))
    for name in SET_NAMES.values():
        shutil.copytree(DEMO_ROOT / "adapters" / name / "v1", tmp_path / "adapters" / name / "v1",
                        ignore=shutil.ignore_patterns(GOLDEN_FILE))
    written = write_golden(tmp_path, ["backbone", *SET_NAMES.values()])
    tok = BlipTokenizer.from_folder(DEMO_ROOT / "backbone")
    for subject, made in written.items():
        where = "backbone" if subject == "backbone" else f"adapters/{subject}/v1"
        assert read_record(tmp_path / where) == made
        shipped = read_record(DEMO_ROOT / where)
        assert shipped is not None, f"{where} ships no {GOLDEN_FILE}"
        fields = ("subject", "ref", "backbone", "device", "dtype")
        assert [getattr(made, f) for f in fields] == [getattr(shipped, f) for f in fields]
        assert {k: v.get("answers") for k, v in made.probes.items()} == \
            {k: v.get("answers") for k, v in shipped.probes.items()}
        verdict = compare(subject, shipped, made, tok)
        assert verdict.ok, verdict.message()
