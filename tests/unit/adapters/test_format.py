"""Adapter-set folders: round trip, versions, and every way a set can fail to load."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from uniadapter_serve.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BackboneInfo,
    SetLimits,
    load_adapter_set,
    new_adapter_set,
    read_adapter_meta,
    save_adapter_set,
)
from uniadapter_serve.errors import AdapterFormatError, AdapterIncompatibleError
from uniadapter_serve.model.loading import backbone_from_state_dict, random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import UniAdapterConfig


@pytest.fixture
def saved(backbone, tmp_path):
    module = random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), seed=41)
    folder = tmp_path / "vqa-set"
    version = save_adapter_set(module, folder, name="vqa-set", backbone=BackboneInfo.of(backbone),
                               answer_list=["red", "blue", "two"])
    return module, folder, version


def _itm(backbone, adapter):
    b = random_batch(backbone, 2, seed=42)
    r = Routing.single(adapter, 2)
    with torch.no_grad():
        return backbone.itm_logits(b.input_ids, b.attention_mask, backbone.encode_image(b.pixel_values, r), r)


def test_round_trip_gives_identical_outputs(backbone, saved):
    module, folder, version = saved
    loaded = load_adapter_set(folder, backbone)
    assert loaded.meta.version == version
    assert loaded.meta.ref == f"vqa-set@{version}"
    assert loaded.meta.answer_list == ["red", "blue", "two"]
    assert loaded.meta.num_parameters == module.num_parameters()
    for k, v in module.state_dict().items():
        assert torch.equal(v, loaded.module.state_dict()[k]), k
    assert torch.equal(_itm(backbone, module), _itm(backbone, loaded.module))
    assert not any(p.requires_grad for p in loaded.module.parameters())


def test_version_is_sha256_prefix_of_weights_and_is_deterministic(backbone, saved, tmp_path):
    module, folder, version = saved
    assert version == hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()[:12]
    again = save_adapter_set(module, tmp_path / "again", name="vqa-set", backbone=BackboneInfo.of(backbone),
                             answer_list=["red", "blue", "two"])
    assert again == version
    with torch.no_grad():
        module.adapters["0"].down_proj.bias.add_(1.0)
    changed = save_adapter_set(module, tmp_path / "changed", name="vqa-set", backbone=BackboneInfo.of(backbone),
                               answer_list=["red", "blue", "two"])
    assert changed != version


def test_fingerprint_mismatch_names_both_fingerprints(backbone, saved, tiny_config):
    _, folder, _ = saved
    other = random_backbone(tiny_config, seed=99)
    with pytest.raises(AdapterIncompatibleError) as err:
        load_adapter_set(folder, other)
    msg = str(err.value)
    assert "vision_model" in msg
    assert backbone.fingerprints["vision_model"] in msg and other.fingerprints["vision_model"] in msg


def test_fingerprint_ignores_dtype_cast_but_not_weights(backbone, tiny_config):
    same = backbone_from_state_dict(tiny_config, {k: v.clone() for k, v in backbone.state_dict().items()})
    assert same.fingerprints == backbone.fingerprints
    changed_state = dict(backbone.state_dict())
    changed_state["text_encoder.encoder.layer.0.output.dense.bias"] = torch.ones(32)
    changed = backbone_from_state_dict(tiny_config, changed_state)
    assert changed.fingerprints["text_encoder"] != backbone.fingerprints["text_encoder"]
    assert changed.fingerprints["vision_model"] == backbone.fingerprints["vision_model"]


def test_shape_mismatch_names_first_tensor_and_leaves_model_unchanged(backbone, saved):
    _, folder, _ = saved
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["adapter"]["bottleneck"] = 16
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    expected = r"adapters\.0\.down_proj\.weight has shape \(8, 32\).*\(16, 32\)"
    with pytest.raises(AdapterIncompatibleError, match=expected):
        load_adapter_set(folder, backbone)
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())


def test_missing_tensor_is_named(backbone, saved, tmp_path):
    _, folder, _ = saved
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["adapter"]["temporal_embedding"] = True
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(AdapterIncompatibleError, match="temporal_embedding is missing"):
        load_adapter_set(folder, backbone)


def test_vqa_set_needs_a_decoder(backbone, saved, tiny_config):
    _, folder, _ = saved
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("text_decoder.")}
    no_decoder = backbone_from_state_dict(tiny_config, state)
    with pytest.raises(AdapterIncompatibleError, match="text_decoder"):
        load_adapter_set(folder, no_decoder)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:5]), "truncated"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-100]), "corrupt"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......"), "corrupt"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b""), "truncated"),
        (lambda d: (d / WEIGHTS_FILE).unlink(), WEIGHTS_FILE),
        (lambda d: (d / CONFIG_FILE).unlink(), CONFIG_FILE),
        (lambda d: (d / CONFIG_FILE).write_text("{bad json"), "not valid JSON"),
        (lambda d: (d / CONFIG_FILE).write_text("[]"), "JSON object"),
        (lambda d: (d / CONFIG_FILE).write_text(json.dumps({"format_version": 99})), "format_version"),
        (lambda d: _edit(d, lambda c: c["adapter"].update(color="red")), "color"),
        (lambda d: _edit(d, lambda c: c["adapter"].update(task="captioning")), "task"),
        (lambda d: _edit(d, lambda c: c.pop("backbone")), "backbone"),
        (lambda d: _edit(d, lambda c: c.update(extra={"rank_k": 0})), "extra.rank_k"),
        (lambda d: _edit(d, lambda c: c.update(extra={"rank_k": "128"})), "extra.rank_k"),
        (lambda d: (d / CONFIG_FILE).write_text("[" * 200_000 + "]" * 200_000), "not valid JSON"),
        (lambda d: _deep_header(d), "corrupt header"),
    ],
    ids=["truncated-8", "truncated-data", "bad-header", "empty", "no-weights", "no-config", "bad-json",
         "not-object", "format-version", "unknown-field", "bad-task", "no-backbone", "rank-k-zero", "rank-k-text",
         "config-nested-200k", "header-nested-200k"],
)
def test_damaged_sets_give_clear_errors(backbone, saved, damage, message):
    _, folder, _ = saved
    damage(folder)
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter_set(folder, backbone)


def _deep_header(folder) -> None:
    """A safetensors header nested 200,000 deep (json.loads raises RecursionError on it)."""
    header = b"[" * 200_000 + b"]" * 200_000
    (folder / WEIGHTS_FILE).write_bytes(len(header).to_bytes(8, "little") + header)


def _edit(folder, change):
    config = json.loads((folder / CONFIG_FILE).read_text())
    change(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))


def test_not_a_folder(backbone, tmp_path):
    with pytest.raises(AdapterFormatError, match="not an adapter-set folder"):
        load_adapter_set(tmp_path / "nope", backbone)


def test_new_set_is_identity_and_matches_backbone_dtype(backbone):
    module = new_adapter_set(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8), seed=0)
    assert next(module.parameters()).dtype == backbone.dtype
    b = random_batch(backbone, 2, seed=43)
    with torch.no_grad():
        bare = backbone.encode_image(b.pixel_values)
        adapted = backbone.encode_image(b.pixel_values, Routing.single(module, 2))
    assert torch.equal(bare, adapted)


def test_loads_in_backbone_dtype(backbone, saved):
    _, folder, _ = saved
    loaded = load_adapter_set(folder, backbone, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.module.parameters()} == {torch.bfloat16}
    assert read_adapter_meta(folder).version == loaded.meta.version


def test_files_are_readable_by_other_users(saved):
    _, folder, _ = saved
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (folder / name).stat().st_mode & 0o777 == 0o644
    assert not list(folder.glob(".*.tmp"))  # no temporary files left behind


def test_set_limits_refuse_what_a_set_may_not_ask_and_clamp_rank_k(backbone, tmp_path):
    """A set may ask for less than the server's limits, never more: over them, `check` (publish) names the
    field and the setting; on disk, rank_k is clamped and an answer list over the cap is refused."""
    module = random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), seed=43)

    def meta(name, answers, rank_k=None):
        extra = {"rank_k": rank_k} if rank_k is not None else None
        save_adapter_set(module, tmp_path / name, name=name, backbone=BackboneInfo.of(backbone),
                         answer_list=answers, extra=extra)
        return read_adapter_meta(tmp_path / name)

    limits = SetLimits(max_rank_k=64, max_answers=5)
    within = meta("within", ["a", "b", "c", "d", "e"], rank_k=64)
    limits.check(within)
    assert limits.rank_k(within, 8) == 64
    assert limits.rank_k(meta("own-default", ["a"]), 8) == 8  # no extra.rank_k: the server's RANK_K
    assert limits.rank_k(None, 8) == 8
    greedy = meta("greedy", ["a", "b"], rank_k=100_000)
    with pytest.raises(AdapterIncompatibleError, match=r"extra.rank_k is 100,000, over this server's limit of 64 "
                                                       r"\(MAX_RANK_K\)"):
        limits.check(greedy)
    assert limits.rank_k(greedy, 8) == 64  # on disk: clamped
    limits.check_answers(greedy)
    wordy = meta("wordy", [f"answer {i}" for i in range(6)])
    for check in (limits.check, limits.check_answers):
        with pytest.raises(AdapterIncompatibleError, match=r"6 answers, over this server's limit of 5 "
                                                           r"\(MAX_ANSWER_LIST\)"):
            check(wordy)
    limits.check(meta("retrieval", None, rank_k=None))  # no list at all: nothing to cap

