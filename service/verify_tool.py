"""`uniadapter verify`, `uniadapter adapters record` and `uniadapter adapters publish`: golden records checked,
written and published from the command line, with the backbone loaded as the server loads it (`Settings` from the
environment, then the command's flags).

`verify` runs every check on demand, nothing cached or skipped: the backbone's record, each set's record (the
adapters root's sets, or the refs named; with the demo backbone and no adapters folder named, the shipped demo sets
too, as the server publishes them), and one mixed batch of every set that loaded (+ the bare backbone) through the
served stages, each row compared with the same row computed alone. It writes nothing unless asked (`record=True`:
the backbone's record where the server writes it, DATA_ROOT/golden/backbone-<fingerprint>.json).
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from uniadapter_serve.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterSetMeta,
    SetLimits,
    check_compatible,
    load_adapter_set,
    read_adapter_meta,
)
from uniadapter_serve.adapters.golden import (
    CLIP_FRAMES,
    GOLDEN_FILE,
    GREEDY_LENGTH,
    QUESTIONS,
    TEXTS,
    GoldenRecord,
    Prober,
    Verdict,
    backbone_fingerprint,
    probe_clip,
    probe_images,
    read_record,
    tolerance,
    write_record,
)
from uniadapter_serve.adapters.inspect import probe_sizes
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.adapters.verification import (
    Verifier,
    backbone_record_home,
    find_backbone_record,
    record_of_another,
)
from uniadapter_serve.errors import (
    AdapterFormatError,
    AdapterIncompatibleError,
    AdapterNotFoundError,
    ConfigError,
    ConflictError,
    GoldenMismatchError,
    GoldenRecordError,
)
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.demo.shipped import DEMO_ROOT, SET_NAMES
from uniadapter_serve.model.loading import local_folder
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import (
    AnswerInput,
    GeneratePlan,
    MatchInput,
    RankPlan,
    TextInput,
    VisionInput,
    VisionOutput,
)
from uniadapter_serve.model.tokenizer import BlipTokenizer, default_answer_list, load_answer_list, load_tokenizer
from uniadapter_serve.model.uniadapter import AdapterSetModule
from uniadapter_serve.service.runtime import load_served_backbone, resolve_device
from uniadapter_serve.service.settings import Settings

SHIPPED_SETS = DEMO_ROOT / "adapters"
"""the demo sets in the package (<name>/v1/): what `uniadapter serve` publishes with the demo backbone"""
RANK_TOP_K = 5
"""answers a rank-mode row of the mixed batch returns (their scores are compared)"""
FAILING = frozenset({"mismatch", "error"})
STRICT_FAILING = FAILING | {"unrecorded", "incompatible"}


def settings_with(**overrides: Any) -> Settings:
    """The server's settings (UNIADAPTER_* environment) with the flags that were given."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise ConfigError(f"invalid settings: {e}") from None


# -- the backbone, as the server loads it ---------------------------------------------------------------------

@dataclass
class Bench:
    """One backbone on one device/dtype with what checks need: its tokenizer, default answers and a Verifier."""

    settings: Settings
    backbone: BlipBackbone
    tokenizer: BlipTokenizer
    verifier: Verifier

    @property
    def prober(self) -> Prober:
        return self.verifier.prober

    @property
    def where(self) -> str:
        device, dtype = self.verifier.where
        return f"{device}/{dtype}"

    @property
    def image_size(self) -> int:
        return int(vision_config(self.backbone.config).image_size)  # type: ignore[arg-type]


def open_backbone(settings: Settings) -> Bench:
    """`settings.backbone` on `settings.device` / `settings.dtype`, as `LocalEngine` loads it."""
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    backbone, _ = load_served_backbone(settings.backbone, device, settings.dtype,  # DTYPE=auto: as the server decides
                                       vit_bf16_from=settings.vit_bf16_from)
    tokenizer = load_tokenizer(settings.backbone, backbone.config)
    prober = Prober(backbone, tokenizer, default_answers(settings))
    return Bench(settings, backbone, tokenizer, Verifier(prober, required=settings.golden_required))


def default_answers(settings: Settings) -> list[str]:
    """The server's default answer list: ANSWER_LIST, else the backbone's own (`default_answer_list`)."""
    if settings.answer_list is not None:
        return load_answer_list(settings.answer_list)
    return default_answer_list(settings.backbone)


# -- the table ------------------------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of `uniadapter verify`'s table."""

    subject: str
    """"backbone", a set's name@version, or "mixed batch: <stage>\""""
    recorded: str
    """device/dtype the record was computed on ("-" where there is none)"""
    checked: str
    probes: int
    """probes of the record (or rows of the mixed batch)"""
    worst: str
    """the probe (or row) closest to its tolerance: "name difference / tolerance\""""
    seconds: float
    result: str
    """pass, mismatch, unrecorded, recorded (written by --record), incompatible (the set does not fit this
    backbone) or error (the set does not load)"""
    detail: str = ""
    compared: int = 0
    """rows compared (a probe has one per image, text, question, ...)"""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 4)
        return out


def format_table(rows: Sequence[Row]) -> str:
    header = ("subject", "recorded on", "checked on", "probes", "worst probe (difference / tolerance)", "seconds",
              "result")
    cells = [(r.subject, r.recorded, r.checked, str(r.probes), r.worst or "-", f"{r.seconds:.3f}", r.result)
             for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    notes = [r.detail if r.detail.startswith(r.subject) else f"{r.subject}: {r.detail}" for r in rows
             if r.result != "pass" and r.detail]
    return "\n".join(lines + (["", *notes] if notes else []))


def failed(rows: Sequence[Row], strict: bool = False) -> list[Row]:
    bad = STRICT_FAILING if strict else FAILING
    return [r for r in rows if r.result in bad]


def _worst(verdict: Verdict) -> str:
    w = verdict.worst
    return f"{w.probe} {w.difference:.3g} / {w.tolerance:.3g}" if w is not None else ""


def _verdict_row(subject: str, verdict: Verdict, where: str) -> Row:
    record = verdict.record
    return Row(subject, f"{record.device}/{record.dtype}", where, len(record.probes), _worst(verdict),
               verdict.seconds, "pass" if verdict.ok else "mismatch", "" if verdict.ok else verdict.message(),
               len(verdict.checks))


# -- verify ---------------------------------------------------------------------------------------------------

@dataclass
class Member:
    """A row owner of the mixed batch: a set that loaded, or the bare backbone (meta and module None)."""

    meta: AdapterSetMeta | None
    module: AdapterSetModule | None

    @property
    def label(self) -> str:
        return self.meta.ref if self.meta is not None else "bare"


def verify(bench: Bench, refs: Sequence[str] = (), *, adapters_dir: Path | None = None,
           record: bool = False) -> list[Row]:
    """Every check, in table order: the backbone, each set, then the mixed batch per stage."""
    rows = [backbone_row(bench, record=record)]
    metas, errors = select_sets(bench.settings, refs, adapters_dir)
    rows += errors
    members = [Member(None, None)]
    for meta in metas:
        row, module = set_row(bench, meta)
        rows.append(row)
        if module is not None:
            members.append(Member(meta, module))
    limit = bench.settings.max_batch_size
    if len(members) > limit:  # a batch the server could run: max_batch_size jobs per stage at most
        members = members[:limit]
    rows += mixed_batch_rows(bench, members)
    return rows


def backbone_row(bench: Bench, *, record: bool = False) -> Row:
    """The backbone's record: beside it, else DATA_ROOT/golden/backbone-<fingerprint>.json (where the server writes
    it on its first start); none is written unless `record`."""
    fallback, fallback_file = backbone_record_home(bench.backbone, bench.settings.data_root)
    folder = local_folder(bench.settings.backbone)
    try:
        found = find_backbone_record(bench.backbone, folder, bench.settings.data_root)
    except GoldenRecordError as e:
        return Row("backbone", "-", bench.where, 0, "", 0.0, "mismatch", f"unreadable golden record: {e}")
    if found is None:
        places = f"{folder / GOLDEN_FILE} or {fallback / fallback_file}" if folder else str(fallback / fallback_file)
        if not record:
            return Row("backbone", "-", bench.where, 0, "", 0.0, "unrecorded",
                       f"no record in {places} (--record writes one)")
        started = time.perf_counter()
        made = bench.prober.record()
        try:
            path = write_record(fallback, made, fallback_file)
        except OSError as e:
            return Row("backbone", "-", bench.where, 0, "", time.perf_counter() - started, "unrecorded",
                       f"no record, and none can be written in {fallback}: {e.strerror}")
        return Row("backbone", bench.where, bench.where, len(made.probes), "", time.perf_counter() - started,
                   "recorded", f"written to {path}")
    if found.subject != "backbone":
        return Row("backbone", f"{found.device}/{found.dtype}", bench.where, len(found.probes), "", 0.0, "mismatch",
                   f"the record beside the backbone is the record of {found.ref or found.subject}")
    row = _verdict_row("backbone", bench.verifier.verify(found, None, "the backbone"), bench.where)
    fingerprint = backbone_fingerprint(bench.backbone)
    if found.backbone != fingerprint and row.result != "pass":
        row.detail += f" (the record was computed on backbone {found.backbone}; this one is {fingerprint})"
    return row


def select_sets(settings: Settings, refs: Sequence[str],
                adapters_dir: Path | None) -> tuple[list[AdapterSetMeta], list[Row]]:
    """The sets to check: `refs` resolved, else every set; from `adapters_dir`, else from the adapters root plus,
    with the demo backbone (and DEMO_CONTENT), the shipped demo sets it lacks. Also a row per unreadable folder."""
    registries = [AdapterRegistry(adapters_dir or settings.adapters_dir)]
    if adapters_dir is None and settings.backbone == "demo" and settings.demo_content and _shipped():
        registries.append(AdapterRegistry(SHIPPED_SETS))
    for registry in registries:
        registry.refresh()
    errors = [Row(where, "-", "-", 0, "", 0.0, "error", message)
              for registry in registries for where, message in registry.errors().items()]
    metas: dict[str, AdapterSetMeta] = {}
    if refs:
        for ref in refs:
            meta = _resolve(registries, ref)
            metas.setdefault(meta.ref, meta)
    else:
        for registry in registries:
            for meta in registry.all():
                metas.setdefault(meta.ref, meta)
    return list(metas.values()), errors


def _shipped() -> bool:
    return all((SHIPPED_SETS / name / "v1" / CONFIG_FILE).is_file() for name in SET_NAMES.values())


def _resolve(registries: Sequence[AdapterRegistry], ref: str) -> AdapterSetMeta:
    first: AdapterNotFoundError | None = None
    for registry in registries:
        try:
            return registry.resolve(ref)
        except AdapterNotFoundError as e:  # the version-not-found error is one too
            first = first or e
    assert first is not None
    raise first


def set_row(bench: Bench, meta: AdapterSetMeta) -> tuple[Row, AdapterSetModule | None]:
    """One set loaded on the bench's device/dtype and checked against its record (the module is returned for the
    mixed batch whenever it loaded)."""
    try:
        module = load_adapter_set(meta.path, bench.backbone, meta=meta).module
    except AdapterIncompatibleError as e:
        return Row(meta.ref, "-", bench.where, 0, "", 0.0, "incompatible", str(e)), None
    except AdapterFormatError as e:
        return Row(meta.ref, "-", bench.where, 0, "", 0.0, "error", str(e)), None
    try:
        found = read_record(meta.path)
    except GoldenRecordError as e:
        return Row(meta.ref, "-", bench.where, 0, "", 0.0, "mismatch", f"unreadable golden record: {e}"), module
    if found is None:
        return Row(meta.ref, "-", bench.where, 0, "", 0.0, "unrecorded",
                   f"no {GOLDEN_FILE}: it serves unverified (`uniadapter adapters record {meta.path}` writes one)"
                   ), module
    wrong = record_of_another(found, meta)
    if wrong:
        return Row(meta.ref, f"{found.device}/{found.dtype}", bench.where, len(found.probes), "", 0.0, "mismatch",
                   wrong), module
    return _verdict_row(meta.ref, bench.verifier.verify(found, module, meta.ref, meta.answer_list), bench.where), module


# -- the mixed batch ------------------------------------------------------------------------------------------

@dataclass
class _Job:
    owner: int
    """index into the members"""
    kind: str
    """image, clip, rank, generate, ... (shown in a failure)"""
    payload: Any


def mixed_batch_rows(bench: Bench, members: Sequence[Member]) -> list[Row]:
    """Per stage: every member's jobs in one batch (`Routing.per_sample`) against each job alone (`Routing.single`),
    within twice the stage's tolerance on this device/dtype (the live self-check's rule)."""
    stages = bench.prober.stages
    device, dtype = bench.verifier.where
    routing_device = bench.backbone.device
    rows: list[Row] = []
    with torch.inference_mode():
        jobs = _vision_jobs(bench, members)

        def run(stage_name: str, stage_jobs: list[_Job]) -> list[Any]:
            """Runs the stage both ways, adds its row, returns the results alone (inputs of the next stages)."""
            stage = stages[stage_name]
            started = time.perf_counter()
            modules = [members[j.owner].module for j in stage_jobs]
            batched = stage([j.payload for j in stage_jobs], Routing.per_sample(modules, routing_device))
            alone = [stage([j.payload], Routing.single(m, 1))[0] for j, m in zip(stage_jobs, modules, strict=True)]
            seconds = time.perf_counter() - started
            tol = 2 * tolerance(stage.kind, dtype, device)
            diffs = [stage.difference(b, a) for b, a in zip(batched, alone, strict=True)]
            names = [f"row {i} ({members[j.owner].label} {j.kind})" for i, j in enumerate(stage_jobs)]
            worst = max(range(len(diffs)), key=lambda i: diffs[i] if not math.isnan(diffs[i]) else math.inf)
            bad = [f"{n} differs from its result alone by {d:.3g}" for n, d in zip(names, diffs, strict=True)
                   if not d <= tol]
            owners = sorted({members[j.owner].label for j in stage_jobs})
            rows.append(Row(f"mixed batch: {stage_name}", "-", f"{device}/{dtype}", len(stage_jobs),
                            f"{names[worst]} {diffs[worst]:.3g} / {tol:.3g}", seconds,
                            "mismatch" if bad else "pass",
                            "; ".join(bad) + f" (tolerance {tol:.3g}; one batch of {', '.join(owners)})"
                            if bad else "", len(stage_jobs)))
            return alone

        seen_alone = run("vision", jobs)
        jobs_text, jobs_itm, jobs_answer = _later_jobs(bench, members, jobs, seen_alone)
        text_alone = run("text", jobs_text) if jobs_text else []
        for job in jobs_itm:  # a frame-aware clip match takes its text's embedding, computed alone
            if isinstance(job.payload, MatchInput) and job.payload.frame_embeddings is not None:
                job.payload.text_embedding = text_alone[_text_index(jobs_text, job)]
        if jobs_itm:
            run("itm", jobs_itm)
        if jobs_answer:
            run("answer", jobs_answer)
    return rows


def _embeds(bench: Bench, member: Member) -> bool:
    """Whether the server computes ITC embeddings for this member's requests (retrieval)."""
    if member.module is None:
        return bench.backbone.vision_proj is not None
    return member.module.config.task == "retrieval"


def _clip_frames(member: Member) -> int | None:
    """Frames of the member's probe clip; None when it takes no videos."""
    config = member.module.config if member.module is not None else None
    if config is None:
        return CLIP_FRAMES
    if config.task == "videoqa" or config.temporal_embedding or config.frame_aware_attention:
        return config.num_frames if config.temporal_embedding else CLIP_FRAMES
    return None


def _vision_jobs(bench: Bench, members: Sequence[Member]) -> list[_Job]:
    """An image per member (each a different probe image; not for VideoQA sets, which take clips only) and a clip
    for those that take videos."""
    images = probe_images(bench.image_size, len(members))
    jobs = []
    for i, member in enumerate(members):
        embed = _embeds(bench, member)
        if member.module is None or member.module.config.task != "videoqa":
            jobs.append(_Job(i, "image", VisionInput(images[i][None], embed=embed)))
        frames = _clip_frames(member)
        if frames is not None:
            jobs.append(_Job(i, "clip", VisionInput(probe_clip(bench.image_size, frames), video=True, embed=embed)))
    return jobs


def _later_jobs(bench: Bench, members: Sequence[Member], vision: list[_Job],
                seen: list[VisionOutput]) -> tuple[list[_Job], list[_Job], list[_Job]]:
    """Text, ITM and answer jobs, each on the visual states its owner's vision jobs computed alone."""
    b, tok = bench.backbone, bench.tokenizer
    texts: list[_Job] = []
    matches: list[_Job] = []
    answers: list[_Job] = []
    lists: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    for job, out in zip(vision, seen, strict=True):
        member = members[job.owner]
        text = TEXTS[job.owner % len(TEXTS)]
        task = member.module.config.task if member.module is not None else None
        if _embeds(bench, member):
            if job.kind == "image":
                texts.append(_Job(job.owner, "caption", TextInput(text)))
            matches.append(_Job(job.owner, f"{job.kind} match",
                                MatchInput(text, out.states, None, out.frame_embeddings, out.tokens_per_frame)))
        if b.text_decoder is not None and task != "retrieval":
            video = task == "videoqa"
            if (job.kind == "clip") != video:
                continue
            own = member.meta.answer_list if member.meta is not None else None
            strings = tuple(own or bench.prober.default_answers)
            if strings not in lists:
                lists[strings] = tok.encode_answers(list(strings))
            k = min(len(strings), bench.settings.rank_k)
            rank = RankPlan(lists[strings], k=k, top_k=min(RANK_TOP_K, k))
            answers.append(_Job(job.owner, f"{job.kind} rank", AnswerInput(QUESTIONS[0], out.states, rank)))
            answers.append(_Job(job.owner, f"{job.kind} generate",
                                AnswerInput(QUESTIONS[1], out.states, GeneratePlan(max_length=GREEDY_LENGTH))))
    return texts, matches, answers


def _text_index(texts: list[_Job], job: _Job) -> int:
    return next(i for i, t in enumerate(texts) if t.owner == job.owner)


# -- record and publish ---------------------------------------------------------------------------------------

def describe_record(record: GoldenRecord, path: Path | None = None) -> dict[str, Any]:
    """What `adapters inspect` and `adapters record` show of a record."""
    size = path.stat().st_size if path is not None and path.is_file() else len(record.to_json())
    return {"subject": record.subject, "ref": record.ref, "device": record.device, "dtype": record.dtype,
            "backbone": record.backbone, "created": record.created, "torch": record.torch_version,
            "probes": probe_sizes(record), "bytes": size, "digest": record.digest}


def record_set(bench: Bench, folder: Path, *, force: bool = False) -> dict[str, Any]:
    """Write `folder`/golden.json for the set there, computed on the bench's device/dtype."""
    _refuse_existing(folder, force)
    loaded = load_adapter_set(folder, bench.backbone)
    started = time.perf_counter()
    record = bench.prober.record(loaded.module, ref=loaded.meta.ref, answer_list=loaded.meta.answer_list)
    path = write_record(folder, record)
    return {"path": str(path), **describe_record(record, path), "seconds": round(time.perf_counter() - started, 3)}


def record_backbone(bench: Bench, folder: Path, *, force: bool = False) -> dict[str, Any]:
    """Write `folder`/golden.json for the bare backbone in `folder` (the bench's backbone, loaded from it)."""
    _refuse_existing(folder, force)
    started = time.perf_counter()
    record = bench.prober.record()
    path = write_record(folder, record)
    return {"path": str(path), **describe_record(record, path), "seconds": round(time.perf_counter() - started, 3)}


def _refuse_existing(folder: Path, force: bool) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    if (folder / GOLDEN_FILE).exists() and not force:
        try:
            old = read_record(folder)
            what = f" (recorded on {old.device}/{old.dtype}, {old.created})" if old is not None else ""
        except GoldenRecordError:
            what = " (unreadable)"
        raise ConflictError(f"{folder / GOLDEN_FILE} exists{what}; --force replaces it")


def publish(bench: Bench, folder: Path, adapters_dir: Path, name: str | None = None) -> dict[str, Any]:
    """Validate the set in `folder` against the bench's backbone and the server's limits, check its golden.json
    (GoldenMismatchError unless this backbone reproduces it) or compute one, then publish it into `adapters_dir`.
    The source folder is left as it is: the record goes into the published version."""
    meta = read_adapter_meta(folder)
    if name is not None and name != meta.name:
        raise ConfigError(f"set folder is named {meta.name!r} in its config, not {name!r}")
    check_compatible(meta, bench.backbone)
    SetLimits(max_rank_k=bench.settings.max_rank_k, max_answers=bench.settings.max_answer_list).check(meta)
    loaded = load_adapter_set(folder, bench.backbone, meta=meta)
    uploaded = read_record(folder)
    started = time.perf_counter()
    if uploaded is not None:
        wrong = record_of_another(uploaded, meta)
        if wrong:
            raise GoldenMismatchError(f"adapter set {meta.ref}: {wrong}")
        verdict = bench.verifier.verify(uploaded, loaded.module, meta.ref, meta.answer_list)
        verdict.raise_for_mismatch()
        record, golden = uploaded, f"verified on {bench.where} (closest: {_worst(verdict)})"
    else:
        record = bench.prober.record(loaded.module, ref=meta.ref, answer_list=meta.answer_list)
        golden = f"recorded on {bench.where}"
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        staging = Path(tmp)
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(folder / file, staging / file)
        if uploaded is not None:
            shutil.copy2(folder / GOLDEN_FILE, staging / GOLDEN_FILE)  # the record as it came, byte for byte
        else:
            write_record(staging, record)
        published = AdapterRegistry(adapters_dir).publish_folder(staging, name)
    return {"ref": published.ref, "path": str(published.path), "golden": golden, "digest": record.digest,
            "seconds": round(seconds, 3)}
