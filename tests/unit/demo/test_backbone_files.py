"""The demo build writes the shipped backbone folder's tokenizer and preprocessor files byte for byte, whatever
the tokenizer did before it was saved (the build saves it after pre-training)."""

from __future__ import annotations

import json

from uniadapter_serve.adapters.demo.build import write_processing_files
from uniadapter_serve.model.demo.shipped import DEMO_ROOT
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
