"""Converters against the official checkpoint layout: every key and shape of the four official UniAdapter
checkpoint kinds (`support.original`, from the reference key list) and BLIP's `model_base.pth`, never a
checkpoint built by inverting our own key map. Values are checked by computing layers from the original
tensors with the paper's equations (`support.oracle`) and comparing with the converted modules."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from support import oracle
from support.original import (
    KEYS_FILE,
    KINDS,
    TINY_HEADS,
    config_for,
    meta_state,
    model_base_shapes,
    official_shapes,
    random_state,
    save_checkpoint,
    shrink,
    shrink_config,
)

from uniadapter_serve.adapters.convert import convert_uniadapter_checkpoint, plan_conversion
from uniadapter_serve.adapters.format import load_adapter_set
from uniadapter_serve.errors import CheckpointError
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.convert import convert_blip_pth, convert_blip_state, merge_backbones
from uniadapter_serve.model.loading import TIED_DECODER_KEYS, load_backbone, load_config
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.text import causal_mask, padding_mask
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig

# Every original key a conversion leaves out on purpose, and why. Anything else must map to one of ours.
DROPPED_ON_PURPOSE = {
    r"^temp$": "ITC temperature: training only",
    r"^(image|text)_queue$": "ITC momentum feature queues: training only",
    r"^idx_queue$": "ITC image-id queue (retrieval): training only",
    r"^ptr_queue$": "ITC queue write pointer (retrieval models)",
    r"^queue_ptr$": "ITC queue write pointer (pre-training, model_base.pth)",
    r"^[^.]+_m\.": "momentum towers (visual_encoder_m, text_encoder_m, *_proj_m, adapters_m): EMA copies",
    r"(^|\.)position_ids$": "position-id buffers: rebuilt from the config",
    r"^adapters_dec\.": "adapters_dec: the VQA code builds this copy but its decoder runs the shared adapters",
    r"^text_decoder\.bert\.encoder\.time_embed$": "the answer decoder's temporal embedding: applied to question "
                                                  "states in the original, never to frames; ours has none",
}
VIT_EPS, BERT_EPS = 1e-6, 1e-12  # BLIP's ViT and med_config.json
HEADS = TINY_HEADS["vision_heads"]
LAYER = 1
PER_LAYER = 1_578_752  # one UniAdapter at d 768, r 512 (reference §4)
KV_PAIR = 198_274  # one K/V low-rank pair at rank 64
RETRIEVAL_HEADS = 395_266


def _on_purpose(key: str) -> bool:
    return any(re.search(p, key) for p in DROPPED_ON_PURPOSE)


def _is_vqa(kind: str) -> bool:
    return kind.startswith("vqa")


def _is_temporal(kind: str) -> bool:
    return kind.endswith(("temporalTrue", "_temporal"))


def _blip_base(image_size: int):
    config = load_config("blip-base")
    config.vision_config.image_size = image_size
    return config


# -- the official key list, at full BLIP-base size, on the meta device ---------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_official_key_maps_or_is_dropped_on_purpose(kind):
    shapes = official_shapes(kind)
    plan = plan_conversion(meta_state(shapes), config_for(kind))
    assert set(plan.mapped).isdisjoint(plan.dropped)
    assert set(plan.mapped) | set(plan.dropped) == set(shapes)
    assert set(plan.dropped) == {k for k in shapes if _on_purpose(k)}
    assert all(plan.dropped.values())  # each with its reason


@pytest.mark.parametrize("kind", KINDS)
def test_every_official_shape_fits_blip_base(kind):
    vqa, temporal = _is_vqa(kind), _is_temporal(kind)
    plan = plan_conversion(meta_state(official_shapes(kind)), config_for(kind))
    blip = _blip_base(480 if vqa else 384)  # the released configs: retrieval at 384 px, VQA at 480
    with torch.device("meta"):
        backbone = BlipBackbone(blip, ["vision_model", "text_encoder", *(["text_decoder"] if vqa else [])])
    ours = {k: tuple(v.shape) for k, v in plan.backbone.items() if k not in TIED_DECODER_KEYS}
    assert ours == {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    for alias, target in TIED_DECODER_KEYS.items():
        if alias in plan.backbone:
            assert plan.backbone[alias].shape == plan.backbone[target].shape
    for section in ("vision_config", "text_config"):
        inferred, base = getattr(plan.backbone_config, section).to_dict(), getattr(blip, section).to_dict()
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                      "patch_size", "vocab_size", "max_position_embeddings", "encoder_hidden_size"):
            assert inferred.get(field) == base.get(field), (section, field)

    expected = UniAdapterConfig.for_task("videoqa" if vqa and temporal else "vqa" if vqa else "retrieval",
                                         bottleneck=512, kv_rank=64, layers=list(range(12)), decoder=vqa,
                                         temporal_embedding=temporal)
    assert plan.adapter_config == expected
    with torch.device("meta"):
        module = AdapterSetModule(expected, backbone.dims, init=False)
    assert {k: tuple(v.shape) for k, v in plan.adapter.items()} == {k: tuple(v.shape)
                                                                    for k, v in module.state_dict().items()}
    # the reference's counts: 12 UniAdapters, K/V pairs (encoder; + decoder in VQA), heads, temporal embedding
    total = 12 * PER_LAYER + KV_PAIR * (2 if vqa else 1) + (0 if vqa else RETRIEVAL_HEADS) + 8 * 768 * temporal
    assert sum(t.numel() for t in plan.adapter.values()) == total


def test_the_drop_list_has_no_dead_entries():
    every = set(model_base_shapes()).union(*(official_shapes(kind) for kind in KINDS))
    for pattern in DROPPED_ON_PURPOSE:
        assert any(re.search(pattern, k) for k in every), pattern


def test_vendored_key_list_is_the_reference():
    reference = Path(__file__).parents[4] / "shared" / "reference" / "uniadapter-checkpoint-keys.json"
    if not reference.is_file():
        pytest.skip(f"{reference} is not in this checkout")
    with gzip.open(KEYS_FILE, "rt") as f:
        assert json.load(f) == json.loads(reference.read_text())


# -- BLIP's model_base.pth ---------------------------------------------------------------------------

def _vit_args(state, prefix):
    return oracle.by_role(state, prefix, oracle.ORIGINAL_VIT), HEADS, VIT_EPS


def _bert_args(state, prefix):
    return oracle.by_role(state, prefix, oracle.ORIGINAL_BERT), HEADS, BERT_EPS


def _inputs(B=2, L=6, N=9, D=32, seed=5):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 2:] = 0
    return torch.randn(B, 17, D, generator=gen), torch.randn(B, L, D, generator=gen), mask, \
        torch.randn(B, N, D, generator=gen)


def _close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    err = (ours.double() - reference).abs().max().item()
    assert err <= 1e-5, f"max |converted - original| = {err:.2e}"


@torch.no_grad()
def test_model_base_pth_converts(tmp_path):
    """Pre-training's checkpoint: its ITC buffers (queue_ptr included) are dropped, and the converted layers
    compute what the original tensors compute."""
    state = random_state(shrink(model_base_shapes()), seed=3)
    _, dropped = convert_blip_state(state)
    assert {"temp", "image_queue", "text_queue", "queue_ptr"} <= set(dropped)
    save_checkpoint(tmp_path / "model_base.pth", state, {"image_size": 224, "queue_size": 57600})
    report = convert_blip_pth(tmp_path / "model_base.pth", tmp_path / "out", **TINY_HEADS)
    assert report["components"] == ["vision_model", "text_encoder", "text_decoder", "heads"]
    assert sum(report["dropped"].values()) == sum(1 for k in state if _on_purpose(k))
    bb = load_backbone(tmp_path / "out")
    pixels_tokens, x, mask, states = _inputs()
    none = Routing.none(2)
    _close(bb.vision_model.encoder.layers[LAYER](pixels_tokens, none),
           oracle.vit_block(pixels_tokens.double(), *_vit_args(state, f"visual_encoder.blocks.{LAYER}."), None))
    _close(bb.text_encoder.encoder.layer[LAYER](x, padding_mask(mask), none),
           oracle.text_layer(x.double(), mask, *_bert_args(state, f"text_encoder.encoder.layer.{LAYER}."), None))
    _close(bb.text_decoder.bert.encoder.layer[LAYER](x, causal_mask(mask, 6, x.device), none, states),
           oracle.multimodal_layer(x.double(), mask, states.double(), None,
                                   *_bert_args(state, f"text_decoder.bert.encoder.layer.{LAYER}."), None, None,
                                   causal=True))
    tokens = torch.randn(2, 17, 32)
    itc = torch.nn.functional.normalize(tokens[:, 0].double() @ state["vision_proj.weight"].double().T
                                        + state["vision_proj.bias"].double(), dim=-1)
    _close(bb.image_features(tokens), itc)


@pytest.mark.parametrize("buffer", ["image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp"])
def test_every_itc_buffer_is_dropped(buffer, tmp_path):
    state = {k: v for k, v in random_state(shrink(model_base_shapes()), seed=4).items()
             if k not in ("temp", "image_queue", "text_queue", "queue_ptr")}
    state[buffer] = torch.zeros(1, 8, dtype=torch.long) if buffer.endswith(("ptr", "idx_queue")) else torch.randn(16)
    save_checkpoint(tmp_path / "a.pth", state)
    report = convert_blip_pth(tmp_path / "a.pth", tmp_path / "out", **TINY_HEADS)
    assert any("ITC" in reason for reason in report["dropped"])


def test_unknown_and_missing_keys_are_listed(tmp_path):
    state = random_state(shrink(model_base_shapes()), seed=3)
    state["visual_encoder.blocks.0.attn.mystery"] = torch.zeros(3)
    save_checkpoint(tmp_path / "a.pth", state)
    with pytest.raises(CheckpointError, match=r"match no BLIP rule.*attn\.mystery"):
        convert_blip_pth(tmp_path / "a.pth", tmp_path / "out", **TINY_HEADS)
    del state["visual_encoder.blocks.0.attn.mystery"], state["visual_encoder.blocks.1.mlp.fc2.bias"]
    save_checkpoint(tmp_path / "b.pth", state)
    with pytest.raises(CheckpointError, match=r"missing keys.*layers\.1\.mlp\.fc2\.bias"):
        convert_blip_pth(tmp_path / "b.pth", tmp_path / "out2", **TINY_HEADS)


# -- UniAdapter checkpoints, tiny, with values ------------------------------------------------------

def _convert(tmp_path, kind, *, config="official", drop=(), seed=11, **overrides):
    """A tiny checkpoint of `kind` with random weights saved as the original saves it, converted."""
    state = {k: v for k, v in random_state(shrink(official_shapes(kind)), seed=seed).items()
             if not any(re.search(p, k) for p in drop)}
    saved = shrink_config(config_for(kind, **overrides)) if config == "official" else None
    save_checkpoint(tmp_path / "checkpoint_05.pth", state, saved)
    report = convert_uniadapter_checkpoint(tmp_path / "checkpoint_05.pth", tmp_path / "bb", tmp_path / "set",
                                           name="ua", **TINY_HEADS)
    bb = load_backbone(tmp_path / "bb")
    return state, report, bb, load_adapter_set(tmp_path / "set", bb).module


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_converted_checkpoint_computes_what_the_original_computes(kind, tmp_path):
    vqa, temporal = _is_vqa(kind), _is_temporal(kind)
    state, report, bb, adapter = _convert(tmp_path, kind)
    cfg = report["adapter_set"]["config"]
    assert report["adapter_set"]["task"] == ("videoqa" if vqa and temporal else "vqa" if vqa else "retrieval")
    assert report["adapter_set"]["config_from"] == "checkpoint config"
    assert (cfg["bottleneck"], cfg["kv_rank"], cfg["temporal_embedding"]) == (64, 4, temporal)
    r = Routing.single(adapter, 2)
    tokens, x, mask, states = _inputs()
    enc = f"text_encoder.encoder.layer.{LAYER}."
    ua = oracle.by_role(state, f"{enc}adapter.", oracle.ORIGINAL_ADAPTER)
    _close(bb.vision_model.encoder.layers[LAYER](tokens, r),
           oracle.vit_block(tokens.double(), *_vit_args(state, f"visual_encoder.blocks.{LAYER}."),
                            oracle.by_role(state, f"visual_encoder.blocks.{LAYER}.adapter.", oracle.ORIGINAL_ADAPTER)))
    _close(bb.text_encoder.encoder.layer[LAYER](x, padding_mask(mask), r),
           oracle.text_layer(x.double(), mask, *_bert_args(state, enc), ua))
    _close(bb.text_encoder.encoder.layer[LAYER](x, padding_mask(mask), r, states, None,
                                                adapter.text_encoder_kv(states)),
           oracle.multimodal_layer(x.double(), mask, states.double(), None, *_bert_args(state, enc), ua,
                                   oracle.kv_by_role(state, "text_encoder.encoder.")))
    if vqa:
        dec = f"text_decoder.bert.encoder.layer.{LAYER}."
        _close(bb.text_decoder.bert.encoder.layer[LAYER](x, causal_mask(mask, 6, x.device), r, states, None,
                                                          adapter.text_decoder_kv(states)),
               oracle.multimodal_layer(x.double(), mask, states.double(), None, *_bert_args(state, dec),
                                       oracle.by_role(state, f"{dec}adapter.", oracle.ORIGINAL_ADAPTER),
                                       oracle.kv_by_role(state, "text_decoder.bert.encoder."), causal=True))
    else:
        proj = oracle.by_role(state, "", {"vision_proj": "vision_proj"})
        _close(bb.image_features(tokens, r),
               torch.nn.functional.normalize(oracle.linear(tokens[:, 0].double(), proj, "vision_proj"), dim=-1))
    if temporal:
        # the original adds time_embed[t] to every token of frame t of the concatenated frame tokens
        frames = torch.randn(2, 8, 5, 32)
        expected = frames.double() + state["text_encoder.encoder.time_embed"].double()[:, :, None, :]
        _close(bb.video_states(frames, r), expected.reshape(2, 40, 32))
        assert cfg["num_frames"] == 8
    if kind == "vqa_temporal":
        assert any("answer decoder's temporal embedding" in reason for reason in report["dropped"])


@pytest.mark.parametrize("kind", ["retrieval_temporalFalse", "vqa"])
def test_options_without_weights_come_from_the_config(kind, tmp_path):
    """Frame-aware attention and the video modality have no tensors: only the saved config tells."""
    _, report, _, adapter = _convert(tmp_path, kind, modality="video", frame_aware_attention=True)
    assert adapter.config.frame_aware_attention is True
    assert report["adapter_set"]["task"] == ("videoqa" if _is_vqa(kind) else "retrieval")
    assert report["adapter_set"]["config"]["frame_aware_attention"] is True


@pytest.mark.parametrize("option", ["adapter_visual", "adapter_textual"])
@torch.no_grad()
def test_branch_flags_come_from_the_config(option, tmp_path):
    """The original builds every up-projection whatever the flags say; a branch the config turns off never
    runs, so the converted set must leave it off too (and say what it dropped)."""
    drop = [r"^visual_encoder\.blocks\.\d+\.adapter\."] if option == "adapter_visual" else []  # never attached
    _, report, bb, adapter = _convert(tmp_path, "retrieval_temporalFalse", drop=drop, **{option: False})
    cfg = report["adapter_set"]["config"]
    visual_off = option == "adapter_visual"
    assert (cfg["visual"], cfg["textual"], cfg["cross_modal"]) == (not visual_off, visual_off, True)
    if visual_off:
        assert not any("visual_up_proj" in k for k in adapter.state_dict())
        assert any("visual branch off" in reason for reason in report["dropped"])
    r, none = Routing.single(adapter, 2), Routing.none(2)
    pixels, ids, (_, _, mask, states) = torch.randn(2, 3, 32, 32), torch.randint(4, 128, (2, 6)), _inputs()
    # the branch that is off leaves its tower's output as the bare backbone's; the others change it
    assert torch.equal(bb.encode_image(pixels, r), bb.encode_image(pixels, none)) == visual_off
    assert torch.equal(bb.encode_text(ids, mask, r), bb.encode_text(ids, mask, none)) == (not visual_off)
    assert not torch.allclose(bb.encode_multimodal(ids, mask, states, routing=r),
                              bb.encode_multimodal(ids, mask, states, routing=none))


@pytest.mark.parametrize("kind", ["retrieval_temporalFalse", "vqa"])
def test_without_a_config_flags_come_from_the_tensor_names(kind, tmp_path):
    _, report, _, _ = _convert(tmp_path, kind, config=None)
    cfg = report["adapter_set"]["config"]
    assert report["adapter_set"]["config_from"] == "tensor names"
    assert report["adapter_set"]["task"] == ("vqa" if _is_vqa(kind) else "retrieval")
    assert (cfg["visual"], cfg["textual"], cfg["cross_modal"], cfg["frame_aware_attention"]) == (True, True, True,
                                                                                                 False)


@pytest.mark.parametrize(("option", "value"), [("temporal_embed", True), ("video_key_adapter_dim", 32),
                                                ("video_key_adapter", False), ("adapter_dim", 128),
                                                ("adapter", False)])
def test_a_config_contradicting_the_tensors_is_refused(option, value, tmp_path):
    with pytest.raises(CheckpointError, match=rf"config says {option}: {value!r}"):
        _convert(tmp_path, "retrieval_temporalFalse", **{option: value})
    assert not (tmp_path / "bb").exists()  # refused before anything is written


def test_disagreeing_aliases_are_refused(tmp_path):
    state = random_state(shrink(official_shapes("retrieval_temporalFalse")), seed=12)
    state["text_encoder.encoder.layer.1.adapter.down_proj.weight"] += 1e-3
    save_checkpoint(tmp_path / "c.pth", state, shrink_config(config_for("retrieval_temporalFalse")))
    with pytest.raises(CheckpointError, match=r"aliases .* disagree.*layer\.1\.adapter\.down_proj\.weight"):
        convert_uniadapter_checkpoint(tmp_path / "c.pth", tmp_path / "bb", tmp_path / "set", name="x", **TINY_HEADS)


def test_truncated_file_and_pickle_code_are_refused(tmp_path):
    save_checkpoint(tmp_path / "ok.pth", random_state(shrink(model_base_shapes()), seed=1))
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        convert_blip_pth(tmp_path / "cut.pth", tmp_path / "o1", **TINY_HEADS)
    torch.save({"model": {}, "args": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="needs pickle code"):
        convert_blip_pth(tmp_path / "evil.pth", tmp_path / "o2", **TINY_HEADS)
    assert not (tmp_path / "o2").exists()


class Payload:
    """Stands for any class a checkpoint could smuggle in; weights_only loading must not build it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_merge_itm_and_vqa_folders(backbone, tiny_config, tmp_path):
    from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering

    from uniadapter_serve.model.testing import randomize_

    torch.manual_seed(0)
    itm = randomize_(BlipForImageTextRetrieval(tiny_config), 1)
    vqa = randomize_(BlipForQuestionAnswering(tiny_config), 2)
    itm.save_pretrained(tmp_path / "itm")
    vqa.save_pretrained(tmp_path / "vqa")
    report = merge_backbones([tmp_path / "vqa", tmp_path / "itm"], tmp_path / "merged")
    merged = load_backbone(tmp_path / "merged")
    assert merged.components == ("vision_model", "text_encoder", "text_decoder", "heads")
    assert report["sources"]["heads"] == str(tmp_path / "itm")
    assert report["sources"]["vision_model"] == str(tmp_path / "vqa")
    assert merged.fingerprints["vision_model"] == load_backbone(tmp_path / "vqa").fingerprints["vision_model"]
    assert merged.fingerprints["heads"] == load_backbone(tmp_path / "itm").fingerprints["heads"]


def test_the_cli_writes_the_tokenizer_it_is_given(tmp_path, capsys):
    """`uniadapter backbone convert --pth F --tokenizer DIR`: the backbone folder gets DIR's tokenizer (and the
    report names it); without --tokenizer it gets the demo vocabulary, and says so."""
    from transformers import BertTokenizer

    from uniadapter_serve.model.tokenizer import BlipTokenizer
    from uniadapter_serve.service.cli import main

    save_checkpoint(tmp_path / "model_base.pth", random_state(shrink(model_base_shapes()), seed=4), {})
    words = tmp_path / "tok"
    vocab = ["[PAD]", "[UNK]", "[DEC]", "[SEP]", "[CLS]", "[ENC]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "zebra"]
    BlipTokenizer(BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})).save(words)
    heads = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_HEADS.items()]
    assert main(["backbone", "convert", "--pth", str(tmp_path / "model_base.pth"), "--out", str(tmp_path / "given"),
                 "--tokenizer", str(words), *heads]) == 0
    assert json.loads(capsys.readouterr().out)["tokenizer"] == str(words)
    given = BlipTokenizer.from_folder(tmp_path / "given")
    assert given.count("zebra") == 1 and len(given.tokenizer) == len(vocab)  # the given vocabulary, whole
    assert main(["backbone", "convert", "--pth", str(tmp_path / "model_base.pth"), "--out", str(tmp_path / "demo"),
                 *heads]) == 0
    assert "demo vocabulary" in json.loads(capsys.readouterr().out)["tokenizer"]
    assert BlipTokenizer.from_folder(tmp_path / "demo").count("zebra") > 1  # the demo vocabulary spells it out


# -- golden records -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["retrieval_temporalTrue", "vqa_temporal"])
def test_converted_folders_carry_golden_records_that_verify(kind, tmp_path):
    """Both folders get golden.json; publishing the set keeps it; it verifies on the converted backbone and is
    refused, naming a probe, on one whose vision layer is perturbed; so is the backbone's own record."""
    from uniadapter_serve.adapters.golden import GOLDEN_FILE, Prober, read_record
    from uniadapter_serve.adapters.manager import AdapterManager
    from uniadapter_serve.adapters.registry import AdapterRegistry
    from uniadapter_serve.adapters.verification import Verifier
    from uniadapter_serve.errors import GoldenMismatchError
    from uniadapter_serve.model.tokenizer import load_answer_list, load_tokenizer

    _, report, bb, _ = _convert(tmp_path, kind)
    assert report["adapter_set"]["golden"] == str(tmp_path / "set" / GOLDEN_FILE)
    bare, own = read_record(tmp_path / "bb"), read_record(tmp_path / "set")
    assert bare is not None and bare.subject == "backbone" and bare.ref is None
    assert own is not None and own.subject == "set" and own.ref == f"ua@{report['adapter_set']['version']}"
    assert (bare.device, bare.dtype) == (own.device, own.dtype) == ("cpu", "float32")
    expected = {"itm", "clip_itm", "clip_itc"} if kind.startswith("retrieval") else {"answer_scores", "greedy"}
    assert expected <= set(own.probes)
    if "answer_scores" in own.probes:  # no list of its own: the default list's first answers
        assert own.probes["answer_scores"]["answers"] == load_answer_list(None)[:8]

    registry = AdapterRegistry(tmp_path / "adapters")
    meta = registry.publish_folder(tmp_path / "set")
    assert (meta.path / GOLDEN_FILE).read_bytes() == (tmp_path / "set" / GOLDEN_FILE).read_bytes()

    def verifier(backbone):
        return Verifier(Prober(backbone, load_tokenizer(tmp_path / "bb", backbone.config), load_answer_list(None)))

    good = verifier(bb)
    with AdapterManager(bb, registry, device_budget_bytes=1 << 30, cpu_budget_bytes=0,
                        verify=good.check_set).lease("ua") as lease:
        assert lease.meta.ref == meta.ref
    assert good.outcomes[meta.ref].result == "pass"
    assert good.check_backbone(tmp_path / "bb", tmp_path / "data").result == "pass"

    noisy = load_backbone(tmp_path / "bb")
    fc = noisy.vision_model.encoder.layers[LAYER].mlp.fc1.weight
    with torch.no_grad():
        fc.add_(torch.randn(fc.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    bad = verifier(noisy)
    with pytest.raises(GoldenMismatchError, match=r"probe \w+\[\d+\] differs by"):
        AdapterManager(noisy, registry, device_budget_bytes=1 << 30, cpu_budget_bytes=0,
                       verify=bad.check_set).acquire("ua")
    assert bad.outcomes[meta.ref].result == "mismatch"
    assert bad.check_backbone(tmp_path / "bb", tmp_path / "data").result == "mismatch"
