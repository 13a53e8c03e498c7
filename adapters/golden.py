"""Golden records: what a set (or the bare backbone) computes on a few fixed probe inputs, written when the set is
published (route, `uniadapter adapters publish`, converters, `uniadapter train`, the demo build) and recomputed
before it serves on a device and dtype (`adapters/verification.py`).

The probes are made from a fixed seed at the backbone's size (structured images: a gradient and three shapes; a clip
of a square crossing the frame; two captions and two questions), never stored media, and they run through the
stages that serve requests (`model/stages.py`) with the set routed as in a batch. What is recorded, by task:
- retrieval: ITC embeddings of the images, texts (and the clip, for video sets) and the ITM log-odds of every
  image/text pair (log-odds, not probabilities: a probability near 0 or 1 hides a change);
- VQA / VideoQA: the log-likelihood of the first answers of the list (the strings are recorded, so verifying does
  not depend on the server's list) and the greedy answer with its score;
- the bare backbone: each image's [CLS] state, plus the above for the heads and decoder it has.

Embeddings and states are unit vectors; each is kept as a 16-number sketch (its projection on 16 fixed random unit
directions): a change anywhere in the vector moves the sketch by at most the change's length, and a record stays a
few KB. `golden.json`:

    {"format": 1, "subject": "set", "ref": "vqa@3f9a1c0e4b2d", "device": "cpu", "dtype": "float32",
     "backbone": "<fingerprint>", "created": "...", "torch": "2.x", "probes": {"answer_scores": {...}, ...}}

Tolerances are per kind and per dtype (`TOLERANCES`): a record computed in one dtype is compared with a run in
another within the sum of both dtypes' tolerances.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from uniadapter_serve.errors import GoldenMismatchError, GoldenRecordError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.preprocess import image_to_pixels
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import (
    AnswerInput,
    GeneratePlan,
    MatchInput,
    MatchStage,
    RankPlan,
    Stage,
    TextInput,
    VisionInput,
    VisionOutput,
    make_stages,
)
from uniadapter_serve.model.tokenizer import QUESTION_WORDS, BlipTokenizer, clean_text
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig

GOLDEN_FILE = "golden.json"
FORMAT = 1
PROBE_SEED = 1009
SKETCH_DIMS = 16
MAX_RECORD_BYTES = 64 * 1024
"""a record is a few KB; anything much larger is not one"""
ANSWERS_SCORED = 8
GREEDY_LENGTH = 8
CLIP_FRAMES = 4
"""frames of the probe clip for sets without a temporal embedding (those take exactly their own count)"""
TEXTS = ("a red circle on the left of a blue square", "two green triangles above a yellow line")
QUESTIONS = ("what color is the circle?", "is the square on the left or the right?")

KINDS = ("unit", "logit", "logp", "text")
TOLERANCES: dict[str, dict[str, float]] = {
    # Measured on the CPU (bench/golden_tolerance.py: the demo model with its sets, and a BLIP-base-sized random
    # model with random sets of std 0.02 and 0.05), the largest difference from float32, times ~4: bfloat16 unit
    # 2.3e-3, ITM probability 1.2e-2, ITM log-odds 6.1e-2, answer log-likelihood 0.22 (a 2-token answer: 0.11
    # per token, the worst) and greedy score 0.39 (9 tokens), margin 5.3e-2; float16 3.2e-4, 7.6e-4, 4e-3, 1.1e-2,
    # 6.6e-3, 3.5e-3.
    # float32 on 1 vs 2 threads: 0 up to rounding (1e-5 on log-likelihoods).
    "float32": {"unit": 2e-4, "prob": 2e-4, "logit": 1e-3, "logp": 1e-3, "margin": 2e-3},
    "float16": {"unit": 2e-3, "prob": 4e-3, "logit": 2e-2, "logp": 3e-2, "margin": 2e-2},
    "bfloat16": {"unit": 1e-2, "prob": 5e-2, "logit": 3e-1, "logp": 3e-1, "margin": 2e-1},
}
"""per dtype: `unit` sketch coordinates of unit vectors, `logit` ITM log-odds (`prob`: ITM probabilities, for the live
self-check), `logp` log-likelihood per answer token (an answer's tolerance is this times its tokens), `margin` one
token's log-probability (a greedy answer may change only where the recorded winner led the runner-up by less than
twice that)"""


def tolerance(kind: str, dtype: str, device: str) -> float:
    """The tolerance of one side of a comparison. CUDA float32 runs the patch embedding's convolution in TF32 (the
    cuDNN default), so it gets the float16 row."""
    if dtype == "float32" and device.startswith("cuda"):
        dtype = "float16"
    return TOLERANCES.get(dtype, TOLERANCES["float32"])[kind]


# -- probe inputs -----------------------------------------------------------------------------------------------

def probe_images(size: int, n: int = 2) -> torch.Tensor:
    """(n, 3, S, S) uint8 RGB at model size, as an upload reaches the vision stage (which normalises it): a vertical
    gradient and three shapes each, from PROBE_SEED."""
    rng = np.random.default_rng(PROBE_SEED)
    out = []
    for _ in range(n):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = np.linspace(0.0, 1.0, size)[:, None, None]
        pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (size, size, 3)).astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(pixels))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, 2))
            w, h = (int(v) for v in rng.integers(max(2, size // 8), max(3, size // 3), 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x0 + w, y0 + h), fill=colour)
        out.append(image_to_pixels(image, size))
    return torch.stack(out)


def probe_clip(size: int, frames: int) -> torch.Tensor:
    """(T, 3, S, S) uint8: a red square crossing a blue-grey frame from left to right."""
    out = []
    side = max(2, size // 4)
    for t in range(frames):
        image = Image.new("RGB", (size, size), (70, 90, 120))
        x = int((size - side) * t / max(1, frames - 1))
        ImageDraw.Draw(image).rectangle((x, size // 3, x + side, size // 3 + side), fill=(220, 40, 40))
        out.append(image_to_pixels(image, size))
    return torch.stack(out)


def _directions(dim: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(PROBE_SEED + dim)
    return F.normalize(torch.randn(dim, SKETCH_DIMS, generator=g, dtype=torch.float64), dim=0)


def sketch(vectors: torch.Tensor) -> list[list[float]]:
    """(B, D) unit vectors -> (B, 16) projections on fixed random unit directions."""
    v = vectors.detach().to("cpu", torch.float64)
    return [[round(float(x), 7) for x in row] for row in v @ _directions(v.shape[1])]


# -- the record -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GoldenRecord:
    subject: str
    """"set" or "backbone\""""
    ref: str | None
    """the set's name@version (None for the backbone)"""
    device: str
    dtype: str
    backbone: str
    """fingerprint of the backbone that computed it"""
    probes: dict[str, dict[str, Any]]
    created: str = ""
    torch_version: str = ""

    def to_json(self) -> bytes:
        return (json.dumps({"format": FORMAT, "subject": self.subject, "ref": self.ref, "device": self.device,
                            "dtype": self.dtype, "backbone": self.backbone, "created": self.created,
                            "torch": self.torch_version, "probes": self.probes}, indent=1) + "\n").encode()

    @property
    def digest(self) -> str:
        """Identifies what a pass was checked against (probes, device, dtype)."""
        body = json.dumps([self.device, self.dtype, self.probes], sort_keys=True).encode()
        return hashlib.sha256(body).hexdigest()[:16]

    @classmethod
    def from_json(cls, data: bytes, source: str = GOLDEN_FILE) -> GoldenRecord:
        if len(data) > MAX_RECORD_BYTES:
            raise GoldenRecordError(f"{source}: {len(data)} bytes, more than a golden record's {MAX_RECORD_BYTES}")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise GoldenRecordError(f"{source}: not JSON ({type(e).__name__})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise GoldenRecordError(f"{source}: not a golden record of format {FORMAT}")
        strings = {k: doc.get(k) for k in ("subject", "device", "dtype", "backbone")}
        bad = [k for k, v in strings.items() if not isinstance(v, str) or len(v) > 128]
        if bad or doc["subject"] not in ("set", "backbone") or not isinstance(doc.get("probes"), dict):
            raise GoldenRecordError(f"{source}: fields {bad or ['subject/probes']} are missing or malformed")
        ref = doc.get("ref")
        if ref is not None and (not isinstance(ref, str) or len(ref) > 200):
            raise GoldenRecordError(f"{source}: ref must be a string")
        probes = {name: _checked_probe(name, probe, source) for name, probe in doc["probes"].items()}
        return cls(doc["subject"], ref, doc["device"], doc["dtype"], doc["backbone"], probes,
                   str(doc.get("created", ""))[:64], str(doc.get("torch", ""))[:64])


def _checked_probe(name: Any, probe: Any, source: str) -> dict[str, Any]:
    where = f"{source}: probe {str(name)[:40]!r}"
    if not isinstance(name, str) or name not in PROBE_NAMES or not isinstance(probe, dict):
        raise GoldenRecordError(f"{where} is not one of {sorted(PROBE_NAMES)}")
    kind = probe.get("kind")
    if kind not in KINDS or kind != PROBE_NAMES[name]:
        raise GoldenRecordError(f"{where}: kind must be {PROBE_NAMES[name]!r}")
    if kind == "text":
        texts, scores, ids, margins = (probe.get(k) for k in ("texts", "scores", "ids", "margins"))
        if not (isinstance(texts, list) and _strings(texts) and _numbers(scores, len(texts))
                and isinstance(ids, list) and len(ids) == len(texts)
                and all(isinstance(r, list) and len(r) <= 64 and all(type(i) is int for i in r) for r in ids)
                and isinstance(margins, list) and len(margins) == len(texts)
                and all(_numbers(m) for m in margins)):
            raise GoldenRecordError(f"{where}: texts, scores, ids and margins must be lists of one row per question")
        return {"kind": kind, "texts": texts, "scores": scores, "ids": ids, "margins": margins}
    values = probe.get("values")
    if not (isinstance(values, list) and 0 < len(values) <= 16 and all(_numbers(row) for row in values)):
        raise GoldenRecordError(f"{where}: values must be up to 16 rows of finite numbers")
    checked: dict[str, Any] = {"kind": kind, "values": values}
    if kind == "logp":  # the answers scored: one per value of every row
        answers = probe.get("answers")
        if not isinstance(answers, list) or not _strings(answers) or any(len(row) != len(answers) for row in values):
            raise GoldenRecordError(f"{where}: answers must list the strings scored, one per value of each row")
        checked["answers"] = answers
    return checked


def _numbers(row: Any, n: int | None = None) -> bool:
    return (isinstance(row, list) and len(row) <= 64 and (n is None or len(row) == n)
            and all(type(x) in (int, float) and math.isfinite(x) for x in row))


def _strings(row: Any) -> bool:
    """Up to 64 strings of up to 200 characters, each valid UTF-8 (JSON's \\ud800 escapes make lone surrogates,
    which the tokenizer cannot encode)."""
    return (isinstance(row, list) and 0 < len(row) <= 64
            and all(isinstance(s, str) and len(s) <= 200 and _utf8(s) for s in row))


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


PROBE_NAMES: dict[str, str] = {
    "image_states": "unit", "image_itc": "unit", "text_itc": "unit", "clip_itc": "unit", "itm": "logit",
    "clip_itm": "logit", "answer_scores": "logp", "greedy": "text"}
"""every probe a record may hold, and its kind"""


def read_record(folder: str | Path, file: str = GOLDEN_FILE) -> GoldenRecord | None:
    """The record in `folder`, None when there is none."""
    path = Path(folder) / file
    try:
        with path.open("rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise GoldenRecordError(f"cannot read {path}: {e.strerror}") from None
    return GoldenRecord.from_json(data, str(path))


def write_record(folder: str | Path, record: GoldenRecord, file: str = GOLDEN_FILE) -> Path:
    path = Path(folder) / file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, record.to_json())
    return path


def backbone_fingerprint(backbone: BlipBackbone) -> str:
    """One fingerprint for the backbone as loaded (its per-component weight hashes)."""
    return hashlib.sha256(json.dumps(backbone.fingerprints, sort_keys=True).encode()).hexdigest()[:16]


# -- computing one ----------------------------------------------------------------------------------------------

@dataclass
class Prober:
    """Runs the probes through the served stages of one backbone."""

    backbone: BlipBackbone
    tokenizer: BlipTokenizer
    default_answers: list[str] = field(default_factory=list)
    """the list the bare backbone and sets without their own list rank (its first ANSWERS_SCORED are recorded)"""
    stages: dict[str, Stage[Any, Any, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.stages:
            self.stages = make_stages(self.backbone, self.tokenizer)
        self.size = int(vision_config(self.backbone.config).image_size)  # type: ignore[arg-type]

    def record(self, module: AdapterSetModule | None = None, *, ref: str | None = None,
               answer_list: list[str] | None = None, answers: list[str] | None = None,
               probes: Sequence[str] | None = None) -> GoldenRecord:
        """The record of `module` (None: the bare backbone). `answers`: score exactly these (when verifying a
        record); else the first answers of `answer_list` (the set's own) or of the default list. `probes`: only
        these (a record's own names, when verifying)."""
        with torch.inference_mode():
            computed = self._compute(module, answers or (answer_list or self.default_answers)[:ANSWERS_SCORED])
        if probes is not None:
            computed = {k: v for k, v in computed.items() if k in probes}
        b = self.backbone
        return GoldenRecord("backbone" if module is None else "set", ref, str(b.device),
                            b.precision, backbone_fingerprint(b), computed,
                            dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), torch.__version__)

    def _compute(self, module: AdapterSetModule | None, answers: list[str]) -> dict[str, dict[str, Any]]:
        config = module.config if module is not None else None
        b = self.backbone
        task = config.task if config is not None else None
        heads = b.vision_proj is not None or (config is not None and "vision_proj" in config.heads)
        out: dict[str, dict[str, Any]] = {}
        images = probe_images(self.size)
        routing = _routing(module, len(images))
        if task is None:
            seen = self.stages["vision"]([VisionInput(i[None], embed=False) for i in images], routing)
            out["image_states"] = {"kind": "unit", "values": sketch(F.normalize(
                torch.stack([s.states[0].float() for s in seen]), dim=-1))}
        if task == "retrieval" or (task is None and heads):
            out.update(self._retrieval(module, images, config))
        if task in ("vqa", "videoqa") or (task is None and b.text_decoder is not None):
            video = task == "videoqa"
            visual = probe_clip(self.size, _clip_frames(config))[None] if video else images[:, None]
            out.update(self._answers(module, visual, video, answers))
        return out

    def _retrieval(self, module: AdapterSetModule | None, images: torch.Tensor,
                   config: UniAdapterConfig | None) -> dict[str, dict[str, Any]]:
        stages = self.stages
        match = stages["itm"]
        assert isinstance(match, MatchStage)
        seen: list[VisionOutput] = stages["vision"]([VisionInput(i[None]) for i in images],
                                                    _routing(module, len(images)))
        texts = stages["text"]([TextInput(t) for t in TEXTS], _routing(module, len(TEXTS)))
        pairs = [MatchInput(t, s.states) for s in seen for t in TEXTS]
        out: dict[str, dict[str, Any]] = {
            "image_itc": {"kind": "unit", "values": sketch(torch.stack([_embedded(s) for s in seen]))},
            "text_itc": {"kind": "unit", "values": sketch(torch.stack(texts))},
            "itm": {"kind": "logit", "values": _rows(match.log_odds(pairs, _routing(module, len(pairs))),
                                                     len(TEXTS))},
        }
        if config is not None and (config.temporal_embedding or config.frame_aware_attention):
            (clip,) = stages["vision"]([VisionInput(probe_clip(self.size, _clip_frames(config)), video=True)],
                                       _routing(module, 1))
            out["clip_itc"] = {"kind": "unit", "values": sketch(_embedded(clip)[None])}
            clip_pairs = [MatchInput(t, clip.states, e if clip.frame_embeddings is not None else None,
                                     clip.frame_embeddings, clip.tokens_per_frame) for t, e in zip(TEXTS, texts,
                                                                                                   strict=True)]
            out["clip_itm"] = {"kind": "logit", "values": [
                [round(float(v), 6) for v in match.log_odds(clip_pairs, _routing(module, len(TEXTS)))]]}
        return out

    def _answers(self, module: AdapterSetModule | None, visual: torch.Tensor, video: bool,
                 answers: list[str]) -> dict[str, dict[str, Any]]:
        """Each question asked of one visual (the first image, the second, or the clip for both)."""
        stages = self.stages
        seen = stages["vision"]([VisionInput(v, video=video, embed=False) for v in visual],
                                _routing(module, len(visual)))
        states = [seen[i % len(seen)].states for i in range(len(QUESTIONS))]
        n = len(QUESTIONS)
        candidates = self.tokenizer.encode_answers(answers)
        ranked = stages["answer"]([AnswerInput(q, s, RankPlan(candidates, k=len(answers), top_k=len(answers)))
                                   for q, s in zip(QUESTIONS, states, strict=True)], _routing(module, n))
        scores = []
        for r in ranked:
            by_index = dict(zip(r.indices, r.scores, strict=True))
            scores.append([round(float(by_index[i]), 5) for i in range(len(answers))])
        greedy = stages["answer"]([AnswerInput(q, s, GeneratePlan(max_length=GREEDY_LENGTH))
                                   for q, s in zip(QUESTIONS, states, strict=True)], _routing(module, n))
        texts = [g.texts[0] for g in greedy]
        ids, margins = self._margins(module, states, texts)
        return {"answer_scores": {"kind": "logp", "answers": list(answers), "values": scores},
                "greedy": {"kind": "text", "texts": texts, "scores": [round(float(g.scores[0]), 5) for g in greedy],
                           "ids": ids, "margins": margins}}

    def _margins(self, module: AdapterSetModule | None, states: list[torch.Tensor],
                 texts: list[str]) -> tuple[list[list[int]], list[list[float]]]:
        """Per greedy answer: its tokens and, at each, how far the chosen token led the runner-up (log-prob), from
        one teacher-forced pass: where a margin is tiny, another dtype may fairly pick the other token."""
        b, tok = self.backbone, self.tokenizer
        all_ids, all_margins = [], []
        for question, s, text in zip(QUESTIONS, states, texts, strict=True):
            routing = _routing(module, 1)
            qids, qmask = tok.encode([clean_text(question, QUESTION_WORDS)], mode="multimodal")
            q = b.encode_multimodal(qids.to(b.device), qmask.to(b.device), s[None], None, routing)
            ids, _ = tok.encode_answers([text])
            logp = F.log_softmax(b.decoder_logits(ids.to(b.device), None, q, qmask.to(b.device), routing)[0].float(),
                                 dim=-1)
            top = logp[:-1].topk(2, dim=-1).values
            all_ids.append([int(i) for i in ids[0].tolist()])
            all_margins.append([round(float(m), 5) for m in (top[:, 0] - top[:, 1]).tolist()])
        return all_ids, all_margins


def _routing(module: AdapterSetModule | None, n: int) -> Routing:
    return Routing.single(module, n) if module is not None else Routing.none(n)


def _embedded(out: VisionOutput) -> torch.Tensor:
    assert out.embedding is not None
    return out.embedding


def _rows(values: list[float], width: int) -> list[list[float]]:
    return [[round(float(v), 7) for v in values[i:i + width]] for i in range(0, len(values), width)]


def _clip_frames(config: UniAdapterConfig | None) -> int:
    return config.num_frames if config is not None and config.temporal_embedding else CLIP_FRAMES


# -- comparing --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    probe: str
    """e.g. "text_itc[1]": the probe and the row"""
    difference: float
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.difference <= self.tolerance


@dataclass
class Verdict:
    subject: str
    record: GoldenRecord
    got: GoldenRecord
    checks: list[Check]
    seconds: float = 0.0
    """time the probes took"""

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def first_failure(self) -> Check | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def worst(self) -> Check | None:
        """The check closest to (or furthest past) its tolerance."""
        return max(self.checks, key=lambda c: c.difference / c.tolerance if c.tolerance else math.inf, default=None)

    def message(self) -> str:
        bad = self.first_failure
        if bad is None:
            return f"{self.subject} matches its golden record on {self.got.device}/{self.got.dtype}"
        return (f"{self.subject} does not reproduce its golden record (recorded on {self.record.device}/"
                f"{self.record.dtype}) on {self.got.device}/{self.got.dtype}: probe {bad.probe} differs by "
                f"{bad.difference:.3g} (tolerance {bad.tolerance:.3g}){'; ' + bad.note if bad.note else ''}")

    def raise_for_mismatch(self) -> None:
        if not self.ok:
            raise GoldenMismatchError(self.message())


def compare(subject: str, record: GoldenRecord, got: GoldenRecord, tokenizer: BlipTokenizer) -> Verdict:
    """Every recorded probe row against the same row computed now, within the sum of both sides' tolerances (an
    answer's log-likelihood: per token, times its tokens)."""
    checks: list[Check] = []
    for name, want in record.probes.items():
        kind = want["kind"]
        tol_kind = "logp" if kind == "text" else kind
        tol = tolerance(tol_kind, record.dtype, record.device) + tolerance(tol_kind, got.dtype, got.device)
        have = got.probes.get(name)
        if have is None:
            checks.append(Check(name, math.inf, tol, "this backbone cannot compute it"))
        elif kind == "text":
            margin = tolerance("margin", record.dtype, record.device) + tolerance("margin", got.dtype, got.device)
            checks.extend(_compare_texts(name, want, have, tol, margin, tokenizer))
        else:
            per = [tol] * len(want["values"][0]) if want["values"] else []
            if kind == "logp":
                per = [tol * n for n in answer_tokens(tokenizer, want.get("answers") or [])]
            checks.extend(_compare_rows(name, want["values"], have["values"], per))
    return Verdict(subject, record, got, checks)


def answer_tokens(tokenizer: BlipTokenizer, answers: list[str]) -> list[int]:
    """Tokens scored of each answer (its word pieces and [SEP]; [DEC] is given)."""
    if not answers:
        return []
    _, mask = tokenizer.encode_answers(answers)
    return [int(n) - 1 for n in mask.sum(dim=1).tolist()]


def _compare_rows(name: str, want: list[list[float]], have: list[list[float]], tols: list[float]) -> list[Check]:
    """One check per row: its element furthest past (or closest to) that element's tolerance."""
    if (len(want) != len(have) or any(len(a) != len(b) for a, b in zip(want, have, strict=False))
            or any(len(w) != len(tols) for w in want)):
        return [Check(name, math.inf, min(tols, default=0.0),
                      f"shape {[len(r) for r in want]} recorded, {[len(r) for r in have]} now")]
    checks = []
    for i, (w, h) in enumerate(zip(want, have, strict=True)):
        worst = max(zip((abs(a - b) for a, b in zip(w, h, strict=True)), tols, strict=True),
                    key=lambda dt: dt[0] / dt[1] if dt[1] else math.inf, default=(0.0, 1.0))
        checks.append(Check(f"{name}[{i}]", *worst))
    return checks


def _compare_texts(name: str, want: dict[str, Any], have: dict[str, Any], tol: float, margin: float,
                   tokenizer: BlipTokenizer) -> list[Check]:
    """The same greedy answer with its score within `tol` per token; or another answer, where the recorded answer
    led the one now chosen by less than twice the per-token `margin` at the first token they differ."""
    checks = []
    for i, (text, score, ids, margins) in enumerate(zip(want["texts"], want["scores"], want["ids"], want["margins"],
                                                        strict=True)):
        probe = f"{name}[{i}]"
        if i >= len(have["texts"]):
            checks.append(Check(probe, math.inf, tol, "not computed"))
            continue
        now = have["texts"][i]
        if now == text:
            checks.append(Check(probe, abs(have["scores"][i] - score), tol * max(1, len(ids) - 1)))
            continue
        now_ids = tokenizer.encode_answers([now])[0][0].tolist()
        shared = min(len(ids), len(now_ids))
        at = next((t for t, (a, b) in enumerate(zip(ids, now_ids, strict=False)) if a != b), shared)
        lead = margins[at - 1] if 0 < at <= len(margins) else math.inf
        checks.append(Check(probe, lead, 2 * margin,
                            f"answered {now!r}, recorded {text!r} (the record's lead at token {at} is {lead:.3g})"))
    return checks
