"""Verified before serving: a set's golden record is recomputed on this server's device and dtype before the set
serves its first request there, and the backbone's at start (`adapters/golden.py` has the records).

A pass is remembered per (set version, record digest, backbone fingerprint, device, dtype), so a set evicted and
loaded again (a hot swap) is not probed again; so is a refusal, so a set that fails is not recomputed per request.
A set without a record serves unverified (or is refused, with `required`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.adapters.golden import (
    GOLDEN_FILE,
    GoldenRecord,
    Prober,
    Verdict,
    backbone_fingerprint,
    compare,
    read_record,
    write_record,
)
from uniadapter_serve.errors import GoldenMismatchError, GoldenRecordError
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.uniadapter import AdapterSetModule

log = logging.getLogger(__name__)


def record_of_another(record: GoldenRecord, meta: AdapterSetMeta) -> str:
    """Why `record` is not the record of `meta`'s version ("" when it is)."""
    if record.subject != "set" or (record.ref or "").rpartition("@")[2] != meta.version:
        return f"its {GOLDEN_FILE} is the record of {record.ref or record.subject}, not of version {meta.version}"
    return ""


def backbone_record_home(backbone: BlipBackbone, data_root: Path) -> tuple[Path, str]:
    """Where a backbone's record is written when its own folder holds none: (DATA_ROOT/golden, file name)."""
    return data_root / "golden", f"backbone-{backbone_fingerprint(backbone)}.json"


def find_backbone_record(backbone: BlipBackbone, folder: Path | None, data_root: Path) -> GoldenRecord | None:
    """The backbone's record: beside it (`folder`/golden.json), else in the data root; None when neither has one."""
    record = read_record(folder) if folder is not None else None
    return record if record is not None else read_record(*backbone_record_home(backbone, data_root))


@dataclass(frozen=True)
class Outcome:
    """What the last check of a subject found."""

    result: str
    """"pass", "mismatch", "unrecorded" (no record: served unverified) or "recorded" (the backbone's record was
    written by this start)"""
    detail: str
    seconds: float = 0.0
    worst: str = ""
    """the probe closest to its tolerance, with difference / tolerance"""

    def to_dict(self) -> dict[str, Any]:
        return {"result": self.result, "detail": self.detail, "seconds": round(self.seconds, 4),
                **({"worst": self.worst} if self.worst else {})}


class Verifier:
    """Checks sets (`check_set`, the manager's hook) and the backbone (`check_backbone`) against their records."""

    def __init__(self, prober: Prober, *, required: bool = False) -> None:
        self.prober = prober
        self.required = required
        self._lock = threading.Lock()
        self._known: dict[tuple[str, ...], Outcome] = {}
        self.outcomes: dict[str, Outcome] = {}
        """set ref (or "backbone") -> its last outcome"""
        self.counts: Counter[tuple[str, str]] = Counter()
        """(subject "set"/"backbone", result) -> checks"""

    @property
    def where(self) -> tuple[str, str]:
        b = self.prober.backbone
        return str(b.device), b.precision

    # -- sets -----------------------------------------------------------------------------------------------

    def check_set(self, meta: AdapterSetMeta, module: AdapterSetModule) -> None:
        """GoldenMismatchError (409) unless `module` (on the serving device) reproduces the set's record."""
        try:
            record = read_record(meta.path)
        except GoldenRecordError as e:
            self._settle("set", meta.ref, Outcome("mismatch", str(e)))
            raise GoldenMismatchError(f"adapter set {meta.ref} has an unreadable golden record: {e}") from None
        if record is None:
            if self.required:
                detail = f"adapter set {meta.ref} has no {GOLDEN_FILE}, and GOLDEN_REQUIRED is set"
                self._settle("set", meta.ref, Outcome("mismatch", detail))
                raise GoldenMismatchError(detail)
            with self._lock:
                first = self.outcomes.get(meta.ref) is None
            if first:
                log.warning("adapter set %s has no %s: it serves unverified", meta.ref, GOLDEN_FILE)
            self._settle("set", meta.ref, Outcome("unrecorded", f"no {GOLDEN_FILE}: serves unverified"))
            return
        other = record_of_another(record, meta)
        if other:
            detail = f"adapter set {meta.ref}: {other}"
            self._settle("set", meta.ref, Outcome("mismatch", detail))
            raise GoldenMismatchError(detail)
        key = (meta.version, record.digest, backbone_fingerprint(self.prober.backbone), *self.where)
        with self._lock:
            known = self._known.get(key)
        if known is not None:
            if known.result == "mismatch":
                raise GoldenMismatchError(known.detail)
            return
        verdict = self.verify(record, module, f"adapter set {meta.ref}", meta.answer_list)
        outcome = self._outcome(verdict)
        with self._lock:
            self._known[key] = outcome
        self._settle("set", meta.ref, outcome)
        if not verdict.ok:
            log.error("%s", verdict.message())
            raise GoldenMismatchError(verdict.message())
        log.info("adapter set %s verified on %s/%s in %.3f s (closest: %s)", meta.ref, *self.where, outcome.seconds,
                 outcome.worst)

    def verify(self, record: GoldenRecord, module: AdapterSetModule | None, subject: str,
               answer_list: list[str] | None = None) -> Verdict:
        """Recompute `record`'s probes with `module` (None: the bare backbone) and compare."""
        started = time.perf_counter()
        answers = record.probes.get("answer_scores", {}).get("answers")
        got = self.prober.record(module, ref=record.ref, answer_list=answer_list, answers=answers,
                                 probes=list(record.probes))
        verdict = compare(subject, record, got, self.prober.tokenizer)
        verdict.seconds = time.perf_counter() - started
        return verdict

    # -- the backbone ---------------------------------------------------------------------------------------------

    def check_backbone(self, folder: Path | None, data_root: Path) -> Outcome:
        """The backbone's record: beside it (`folder`), else in `data_root/golden/`; verified when one exists,
        written there (never into the backbone's folder) on the first start without one. Returns the outcome;
        a mismatch is for the caller to act on (the server stays unready)."""
        fallback, fallback_file = backbone_record_home(self.prober.backbone, data_root)
        try:
            record = find_backbone_record(self.prober.backbone, folder, data_root)
        except GoldenRecordError as e:
            return self._settle("backbone", "backbone", Outcome("mismatch", f"the backbone's golden record: {e}"))
        if record is None:
            started = time.perf_counter()
            made = self.prober.record()
            try:
                path = write_record(fallback, made, fallback_file)
            except OSError as e:  # a read-only data root: serve, unverified, and say so
                log.warning("cannot write the backbone's golden record in %s (%s): it serves unverified", fallback,
                            e.strerror)
                return self._settle("backbone", "backbone", Outcome(
                    "unrecorded", f"no record, and none can be written in {fallback}: {e.strerror}"))
            log.info("backbone golden record written to %s (%s/%s)", path, made.device, made.dtype)
            return self._settle("backbone", "backbone", Outcome(
                "recorded", f"written to {path} on {made.device}/{made.dtype}", time.perf_counter() - started))
        verdict = self.verify(record, None, "the backbone")
        outcome = self._outcome(verdict)
        fingerprint = backbone_fingerprint(self.prober.backbone)
        if not verdict.ok and record.backbone != fingerprint:
            outcome = dataclasses.replace(outcome, detail=f"{outcome.detail} (the record was computed on backbone "
                                                          f"{record.backbone}; this one is {fingerprint})")
        self._settle("backbone", "backbone", outcome)
        if verdict.ok:
            log.info("backbone verified on %s/%s in %.3f s (closest: %s)", *self.where, outcome.seconds, outcome.worst)
        else:
            log.error("%s", verdict.message())
        return outcome

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    @staticmethod
    def _outcome(verdict: Verdict) -> Outcome:
        worst = verdict.worst
        where = f"{worst.probe} {worst.difference:.3g} / {worst.tolerance:.3g}" if worst is not None else ""
        return Outcome("pass" if verdict.ok else "mismatch", verdict.message(), verdict.seconds, where)

    def _settle(self, subject: str, name: str, outcome: Outcome) -> Outcome:
        with self._lock:
            self.outcomes[name] = outcome
            self.counts[(subject, outcome.result)] += 1
        return outcome

    def table(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: o.to_dict() for name, o in self.outcomes.items()}
