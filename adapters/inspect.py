"""`uniadapter adapters inspect`: what a set is, how big, and whether it fits a backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from uniadapter_serve.adapters.format import check_compatible, read_adapter_meta
from uniadapter_serve.errors import AdapterIncompatibleError
from uniadapter_serve.model.backbone import BlipBackbone


def inspect_adapter_set(folder: str | Path, backbone: BlipBackbone | None = None) -> dict[str, Any]:
    """A JSON-able report of one set; `compatible` is filled in when a backbone is given."""
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
    if backbone is not None:
        try:
            check_compatible(meta, backbone)
            report["compatible"], report["incompatibility"] = True, None
        except AdapterIncompatibleError as e:
            report["compatible"], report["incompatibility"] = False, str(e)
    return report


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
    if "compatible" in report:
        lines.append("compatible    yes" if report["compatible"] else f"compatible    NO: {report['incompatibility']}")
    return "\n".join(lines)
