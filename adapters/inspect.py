"""`uniadapter adapters inspect`: what a set is, how big, its golden record, and whether it fits (and reproduces
its record on) a backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniadapter_serve.adapters.format import AdapterSetMeta, check_compatible, load_adapter_set, read_adapter_meta
from uniadapter_serve.adapters.golden import GOLDEN_FILE, GoldenRecord, read_record
from uniadapter_serve.adapters.verification import Verifier
from uniadapter_serve.errors import AdapterIncompatibleError, GoldenRecordError
from uniadapter_serve.model.backbone import BlipBackbone


def inspect_adapter_set(folder: str | Path, backbone: BlipBackbone | None = None, *,
                        verifier: Verifier | None = None) -> dict[str, Any]:
    """A JSON-able report of one set; `compatible` is filled in when a backbone is given (the verifier's, if one is
    given), and `verified` (its golden record recomputed on that backbone) with a verifier."""
    if backbone is None and verifier is not None:
        backbone = verifier.prober.backbone
    meta = read_adapter_meta(folder)
    cfg = meta.config
    report: dict[str, Any] = {
        "name": meta.name,
        "version": meta.version,
        "ref": meta.ref,
        "path": str(meta.path),
        "task": cfg.task,
        "bottleneck": cfg.bottleneck,
        "layers": cfg.layers if cfg.layers is not None else list(range(meta.backbone.dims.num_layers)),
        "branches": {"visual": cfg.visual, "textual": cfg.textual, "cross_modal": cfg.cross_modal,
                     "decoder": cfg.decoder, "kv_rank": cfg.kv_rank},
        "heads": cfg.heads,
        "tunable_parameters": meta.num_parameters,
        "backbone_parameters": meta.backbone_parameters(),
        "percent_of_backbone": round(meta.percent_of_backbone(), 3),
        "backbone_fingerprints": {c: meta.backbone.fingerprints.get(c) for c in meta.required_components()},
        "answer_list_size": len(meta.answer_list) if meta.answer_list is not None else None,
        "created": meta.created,
    }
    record = _golden(meta, report)
    if backbone is not None:
        try:
            check_compatible(meta, backbone)
            report["compatible"], report["incompatibility"] = True, None
        except AdapterIncompatibleError as e:
            report["compatible"], report["incompatibility"] = False, str(e)
    if verifier is not None and record is not None and report.get("compatible"):
        wrong = report.get("golden_error")
        report["verified"] = _verify(meta, record, verifier) if not wrong else {
            "result": "mismatch", "on": "/".join(verifier.where), "worst": "", "seconds": 0.0,
            "detail": f"its {GOLDEN_FILE} is {wrong}"}
    return report


def _golden(meta: AdapterSetMeta, report: dict[str, Any]) -> GoldenRecord | None:
    """Fills in report["golden"] (None when the set has no record) or report["golden_error"]."""
    try:
        record = read_record(meta.path)
    except GoldenRecordError as e:
        report["golden"], report["golden_error"] = None, str(e)
        return None
    if record is None:
        report["golden"] = None
        return None
    path = meta.path / GOLDEN_FILE
    report["golden"] = {"ref": record.ref, "device": record.device, "dtype": record.dtype,
                        "backbone": record.backbone, "created": record.created, "torch": record.torch_version,
                        "probes": probe_sizes(record), "bytes": path.stat().st_size, "digest": record.digest}
    if record.subject != "set" or (record.ref or "").rpartition("@")[2] != meta.version:
        report["golden_error"] = f"the record of {record.ref or record.subject}, not of version {meta.version}"
    return record


def probe_sizes(record: GoldenRecord) -> dict[str, str]:
    """probe -> its size: "rows x numbers" (sketches, probabilities, answer scores) or "N answers" (greedy)."""
    sizes = {}
    for name, probe in record.probes.items():
        if probe["kind"] == "text":
            sizes[name] = f"{len(probe['texts'])} answers"
        else:
            values = probe["values"]
            sizes[name] = f"{len(values)}x{len(values[0]) if values else 0}"
    return sizes


def _verify(meta: AdapterSetMeta, record: GoldenRecord, verifier: Verifier) -> dict[str, Any]:
    backbone = verifier.prober.backbone
    module = load_adapter_set(meta.path, backbone, meta=meta).module
    verdict = verifier.verify(record, module, meta.ref, meta.answer_list)
    worst = verdict.worst
    device, dtype = verifier.where
    return {"result": "pass" if verdict.ok else "mismatch", "on": f"{device}/{dtype}",
            "worst": f"{worst.probe} {worst.difference:.3g} / {worst.tolerance:.3g}" if worst is not None else "",
            "seconds": round(verdict.seconds, 3), "detail": verdict.message()}


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"adapter set   {report['ref']}",
        f"path          {report['path']}",
        f"task          {report['task']}",
        f"bottleneck    {report['bottleneck']}  (layers {report['layers']})",
        "branches      " + ", ".join(f"{k}={v}" for k, v in report["branches"].items()),
        f"heads         {', '.join(report['heads']) or '-'}",
        f"tunable       {report['tunable_parameters']:,} parameters "
        f"({report['tunable_parameters'] / 1e6:.2f} M) = {report['percent_of_backbone']:.2f} % of the "
        f"{report['backbone_parameters'] / 1e6:.1f} M-parameter {report['task']} backbone",
        "fingerprints  " + ", ".join(f"{k}={v}" for k, v in report["backbone_fingerprints"].items()),
        f"created       {report['created']}",
    ]
    if report.get("answer_list_size") is not None:
        lines.append(f"answer list   {report['answer_list_size']} answers")
    lines += _golden_lines(report)
    if "compatible" in report:
        lines.append("compatible    yes" if report["compatible"] else f"compatible    NO: {report['incompatibility']}")
    verified = report.get("verified")
    if verified is not None:
        lines.append(f"verified      {'yes' if verified['result'] == 'pass' else 'NO'} on {verified['on']} in "
                     f"{verified['seconds']:.3f} s (closest: {verified['worst'] or '-'})")
        if verified["result"] != "pass":
            lines.append(f"              {verified['detail']}")
    return "\n".join(lines)


def _golden_lines(report: dict[str, Any]) -> list[str]:
    golden = report.get("golden")
    error = report.get("golden_error")
    if golden is None:
        return [f"golden        unreadable: {error}" if error else
                f"golden        none (the set serves unverified; `uniadapter adapters record {report['path']}` "
                "writes one)"]
    lines = [f"golden        recorded on {golden['device']}/{golden['dtype']}, {golden['created']}, "
             f"{golden['bytes']:,} bytes, digest {golden['digest']}",
             "probes        " + ", ".join(f"{k} {v}" for k, v in golden["probes"].items())]
    if error:
        lines.append(f"              NOT this version's: {error}")
    return lines
