"""The `uniadapter` command."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from uniadapter_serve.errors import ConfigError, UniAdapterError

if TYPE_CHECKING:
    from uniadapter_serve.service.verify_tool import Bench


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from uniadapter_serve.service.app import create_app
    from uniadapter_serve.service.server_limits import limited_protocol, raise_file_limit
    from uniadapter_serve.service.settings import Settings

    overrides = {k: v for k, v in {"backbone": args.backbone, "adapters_root": args.adapters_root,
                                   "device": args.device, "host": args.host, "port": args.port}.items()
                 if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.processes > 1 and not args.reuse_port:
        from uniadapter_serve.service.processes import supervise

        return supervise(settings, [sys.executable, "-m", "uniadapter_serve.service.cli", *sys.argv[1:]])
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the previous handler;
    # this one turns it into a clean exit (status 0) instead of death by signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    raise_file_limit(settings.max_connections)
    app = create_app(settings)
    # the protocol caps connections (total, per client) and times out slow headers and bodies; no route
    # speaks WebSocket, so upgrades are not offered (a hijacked connection would escape those limits)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(1, round(settings.request_timeout_s)),
                            http=limited_protocol(app.state.connection_gate), ws="none")
    server = uvicorn.Server(config)
    sockets = None
    if args.reuse_port:  # one of PROCESSES: its own listening socket in the port's SO_REUSEPORT group
        from uniadapter_serve.service.processes import reuse_port_socket

        sockets = [reuse_port_socket(settings.host, settings.port)]
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    return 0 if server.started else 3  # uvicorn's start-up failure status


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _cmd_adapters_inspect(args: argparse.Namespace) -> int:
    from uniadapter_serve.adapters.golden import Prober
    from uniadapter_serve.adapters.inspect import format_report, inspect_adapter_set
    from uniadapter_serve.adapters.verification import Verifier
    from uniadapter_serve.model.loading import load_backbone
    from uniadapter_serve.model.tokenizer import load_tokenizer

    verifier = None
    if args.backbone:
        backbone = load_backbone(args.backbone)
        verifier = Verifier(Prober(backbone, load_tokenizer(args.backbone, backbone.config)))
    report = inspect_adapter_set(args.path, verifier=verifier)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not report.get("compatible", True):
        return 3
    return 1 if report.get("verified", {}).get("result") == "mismatch" else 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from uniadapter_serve.service import verify_tool

    settings = verify_tool.settings_with(backbone=args.backbone, device=args.device, dtype=args.dtype,
                                         data_root=args.data_root)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    bench = verify_tool.open_backbone(settings)
    rows = verify_tool.verify(bench, args.adapter or (), adapters_dir=args.adapters_dir, record=args.record)
    bad = verify_tool.failed(rows, strict=args.strict or settings.golden_required)
    if args.json:
        print(json.dumps({"backbone": settings.backbone, "on": bench.where, "ok": not bad,
                          "rows": [r.to_dict() for r in rows]}, indent=2))
    else:
        print(verify_tool.format_table(rows))
        counts = Counter(r.result for r in rows)
        print(f"\nverify: {', '.join(f'{n} {result}' for result, n in sorted(counts.items()))} on {bench.where} "
              f"(backbone {settings.backbone}): {'FAILED' if bad else 'ok'}")
    return 1 if bad else 0


def _record_bench(args: argparse.Namespace, backbone: str | None) -> Bench:
    from uniadapter_serve.service import verify_tool

    settings = verify_tool.settings_with(backbone=backbone, device=args.device, dtype=args.dtype)
    return verify_tool.open_backbone(settings)


def _cmd_adapters_record(args: argparse.Namespace) -> int:
    from uniadapter_serve.service import verify_tool

    folder = Path(args.folder)
    if args.backbone_record:
        if args.backbone:
            raise ConfigError("--backbone-record records the backbone in FOLDER: leave out --backbone")
        report = verify_tool.record_backbone(_record_bench(args, str(folder)), folder, force=args.force)
    else:
        report = verify_tool.record_set(_record_bench(args, args.backbone), folder, force=args.force)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_adapters_publish(args: argparse.Namespace) -> int:
    from uniadapter_serve.service import verify_tool

    bench = _record_bench(args, args.backbone)
    target = Path(args.adapters_dir) if args.adapters_dir else bench.settings.adapters_dir
    print(json.dumps(verify_tool.publish(bench, Path(args.folder), target, args.name), indent=2))
    return 0


def _cmd_index_add(args: argparse.Namespace) -> int:
    from uniadapter_serve.service.indexing import index_paths
    from uniadapter_serve.service.settings import Settings

    overrides = {k: v for k, v in {"backbone": args.backbone, "data_root": args.data_root,
                                   "media_root": args.media_root}.items() if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    moments = None
    if args.moments is not None:
        from uniadapter_serve.service.collections.store import MomentSpec

        window, _, stride = args.moments.partition(",")
        try:
            moments = MomentSpec(float(window) if window else settings.moment_window_s,
                                 float(stride) if stride else settings.moment_stride_s)
        except ValueError:
            print(f"--moments: give WINDOW_S[,STRIDE_S] in seconds, got {args.moments!r}", file=sys.stderr)
            return 2
    report = index_paths(settings, args.collection, args.paths, batch_size=args.batch_size, create=args.create,
                         adapter=args.adapter, index=args.index, progress=not args.quiet, moments=moments)
    print(json.dumps(report, indent=2))
    return 0


TOKENIZER_HELP = ("folder holding BLIP's tokenizer (bert-base-uncased's vocabulary) to write beside the backbone; "
                  "without one the demo vocabulary is written")


def _cmd_adapters_convert(args: argparse.Namespace) -> int:
    from uniadapter_serve.adapters.convert import convert_uniadapter_checkpoint

    report = convert_uniadapter_checkpoint(args.checkpoint, args.backbone_out, args.set_out, name=args.name,
                                           task=args.task, vision_heads=args.vision_heads,
                                           text_heads=args.text_heads, tokenizer=args.tokenizer)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_backbone_convert(args: argparse.Namespace) -> int:
    from uniadapter_serve.model.convert import convert_blip_pth, merge_backbones

    if bool(args.pth) == bool(args.hf):
        raise ConfigError("give either --pth FILE or one or more --hf FOLDER")
    if args.pth:
        report = convert_blip_pth(args.pth, args.out, vision_heads=args.vision_heads, text_heads=args.text_heads,
                                  tokenizer=args.tokenizer)
    else:
        if args.tokenizer:
            raise ConfigError("--tokenizer goes with --pth (merged --hf folders keep the first one's tokenizer)")
        report = merge_backbones(args.hf, args.out)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from uniadapter_serve.adapters.cli_tasks import dumps, run_train

    print(dumps(run_train(args)))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from uniadapter_serve.adapters.cli_tasks import dumps, run_eval

    print(dumps(run_eval(args)))
    return 0


GOLDEN = "golden.json"


def _record_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", help="backbone source (default: UNIADAPTER_BACKBONE or 'demo')")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda[:N] | auto")
    p.add_argument("--dtype", default="float32", help="float32 (default: a record is compared within the sum of "
                   "both sides' tolerances, so float32 on the CPU makes the tightest one) | float16 | bfloat16")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=["retrieval", "vqa", "videoqa"])
    p.add_argument("--backbone", default="demo", help="backbone source (default: demo)")
    p.add_argument("--data", default="demo", choices=["demo", "karpathy", "vqa2", "msrvtt", "msrvtt-qa"],
                   help="demo world, COCO/Flickr Karpathy JSON, VQA v2 JSON, MSRVTT captions or MSRVTT-QA JSON")
    p.add_argument("--annotations", help="Karpathy JSON, VQA v2 annotations JSON, or MSRVTT: the release JSON, "
                   "BLIP-style JSON lines (clip_name, caption), a JSON list of {video, caption}, or the 1k-A test CSV")
    p.add_argument("--questions", help="VQA v2 questions JSON, or MSRVTT-QA JSON")
    p.add_argument("--video-list", help="MSRVTT: the videos to keep (MSRVTT_train.9k.csv / .7k.csv, "
                   "train_list_jsfusion.txt), e.g. the 1k-A split's 9k training videos")
    p.add_argument("--media-root", help="folder the annotation file's images or videos are under")
    p.add_argument("--examples", type=int, default=2000, help="demo: scenes/clips to generate; real: cap")
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uniadapter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (the embedded demo model by default)")
    serve.add_argument("--backbone", help="backbone source (default: UNIADAPTER_BACKBONE or 'demo')")
    serve.add_argument("--adapters-root", help="folder of adapter sets")
    serve.add_argument("--device", help="auto | cpu | cuda[:N]")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # a child of PROCESSES > 1
    serve.set_defaults(func=_cmd_serve)

    adapters = sub.add_parser("adapters", help="adapter-set tools")
    adapters_sub = adapters.add_subparsers(dest="adapters_command", required=True)
    inspect = adapters_sub.add_parser("inspect", help="task, version, size and compatibility of a set")
    inspect.add_argument("path", help="adapter-set folder")
    inspect.add_argument("--backbone", help="check compatibility with this backbone source, and recompute the "
                         "set's golden record on it (CPU, float32; exit code 1 if it does not reproduce)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_cmd_adapters_inspect)
    record = adapters_sub.add_parser("record", help=f"write a set's (or a backbone's) golden record, {GOLDEN}")
    record.add_argument("folder", help="adapter-set folder (or backbone folder, with --backbone-record)")
    record.add_argument("--backbone-record", action="store_true",
                        help="FOLDER is a backbone: record the bare backbone into FOLDER/golden.json")
    _record_args(record)
    record.add_argument("--force", action="store_true", help=f"replace an existing {GOLDEN}")
    record.set_defaults(func=_cmd_adapters_record)
    publish = adapters_sub.add_parser("publish", help="validate a set folder, verify its golden record (or write "
                                      "one), and publish it as a new version")
    publish.add_argument("folder", help="adapter-set folder (left unchanged: the record goes into the new version)")
    publish.add_argument("--adapters-dir", help="adapters root to publish into (default: UNIADAPTER_ADAPTERS_ROOT "
                         "or DATA_ROOT/adapters); a running server sees the version within seconds")
    publish.add_argument("--name", help="set name (must match the folder's config)")
    _record_args(publish)
    publish.set_defaults(func=_cmd_adapters_publish)
    convert = adapters_sub.add_parser("convert", help="UniAdapter checkpoint_XX.pth -> backbone folder + adapter set")
    convert.add_argument("checkpoint")
    convert.add_argument("--backbone-out", required=True, help="folder for the frozen backbone")
    convert.add_argument("--set-out", required=True, help="folder for the adapter set")
    convert.add_argument("--name", required=True, help="adapter set name")
    convert.add_argument("--task", choices=["retrieval", "vqa", "videoqa"], help="default: vqa if a decoder is there")
    convert.add_argument("--vision-heads", type=int, help="attention heads (default hidden/64)")
    convert.add_argument("--text-heads", type=int)
    convert.add_argument("--tokenizer", help=TOKENIZER_HELP)
    convert.set_defaults(func=_cmd_adapters_convert)

    verify = sub.add_parser("verify", help="recompute the golden records of the backbone and the adapter sets on "
                            "a device/dtype, and a mixed batch of every set against each row alone; prints a table "
                            "(exit code 1 on any mismatch)")
    verify.add_argument("--adapter", action="append", metavar="REF",
                        help="check only this set (name or name@version); repeat for more (default: every set)")
    verify.add_argument("--backbone", help="backbone source (default: UNIADAPTER_BACKBONE or 'demo')")
    verify.add_argument("--device", help="auto | cpu | cuda[:N] (default: UNIADAPTER_DEVICE or auto)")
    verify.add_argument("--dtype", help="auto | float32 | float16 | bfloat16 (default: UNIADAPTER_DTYPE or auto)")
    verify.add_argument("--adapters-dir", type=Path, help="check the sets in this adapters root only (default: "
                        "the server's, plus the shipped demo sets with the demo backbone)")
    verify.add_argument("--data-root", help="where the backbone's record is looked for when none is beside it "
                        "(DATA_ROOT/golden/), and the default adapters root")
    verify.add_argument("--record", action="store_true", help="write the backbone's record to DATA_ROOT/golden/ "
                        "when it has none (as the server does on its first start)")
    verify.add_argument("--strict", action="store_true", help="unrecorded or incompatible sets (and an unrecorded "
                        "backbone) fail too; so does UNIADAPTER_GOLDEN_REQUIRED")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=_cmd_verify)

    backbone = sub.add_parser("backbone", help="backbone tools")
    backbone_sub = backbone.add_subparsers(dest="backbone_command", required=True)
    bconvert = backbone_sub.add_parser("convert", help="original BLIP .pth, or transformers folders (merged)")
    bconvert.add_argument("--pth", help="original BLIP checkpoint")
    bconvert.add_argument("--hf", action="append", help="transformers BLIP folder; repeat to merge ITM + VQA")
    bconvert.add_argument("--out", required=True)
    bconvert.add_argument("--vision-heads", type=int)
    bconvert.add_argument("--text-heads", type=int)
    bconvert.add_argument("--tokenizer", help=TOKENIZER_HELP)
    bconvert.set_defaults(func=_cmd_backbone_convert)
    tr = sub.add_parser("train", help="train an adapter set (or a baseline) on the frozen backbone")
    _data_args(tr)
    modes = tr.add_mutually_exclusive_group()
    modes.add_argument("--mode", default="uniadapter", choices=["uniadapter", "heads", "full"],
                       help="uniadapter (default), or a baseline: heads (frozen backbone, task heads only), full")
    modes.add_argument("--heads-only", dest="mode", action="store_const", const="heads", help="= --mode heads")
    modes.add_argument("--full-finetune", dest="mode", action="store_const", const="full", help="= --mode full")
    tr.add_argument("--out", required=True, help="adapter-set folder to write")
    tr.add_argument("--name", required=True, help="adapter set name")
    tr.add_argument("--steps", type=int, default=500)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=1e-3)
    tr.add_argument("--bottleneck", type=int, default=64)
    tr.add_argument("--kv-rank", type=int, default=16)
    tr.add_argument("--answer-list", help="VQA candidate answers JSON (default: the training answers)")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="recall@k (retrieval) or accuracy (VQA, VideoQA)")
    _data_args(ev)
    ev.add_argument("--adapter", help="adapter-set folder (default: the bare backbone)")
    ev.add_argument("--split", default="test", help="demo: train/val/test; real: the annotation split")
    ev.set_defaults(func=_cmd_eval)

    index = sub.add_parser("index", help="collection tools")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    add = index_sub.add_parser("add", help="embed files under the media root into a collection (resumable)")
    add.add_argument("--collection", required=True)
    add.add_argument("paths", nargs="+", help="files or folders under the media root")
    add.add_argument("--create", choices=["image", "video", "text"], help="create the collection if missing")
    add.add_argument("--adapter", help="retrieval set for a new collection")
    add.add_argument("--index", default="flat", help="FAISS factory string for a new collection")
    add.add_argument("--moments", nargs="?", const="", metavar="WINDOW_S[,STRIDE_S]",
                     help="a new video collection indexes moments (windows of each video; default "
                          "MOMENT_WINDOW_S / MOMENT_STRIDE_S)")
    add.add_argument("--batch-size", type=int, default=32)
    add.add_argument("--backbone")
    add.add_argument("--data-root")
    add.add_argument("--media-root")
    add.add_argument("--quiet", action="store_true", help="no progress bar")
    add.set_defaults(func=_cmd_index_add)

    colls = sub.add_parser("collections", help="collection store tools")
    colls_sub = colls.add_subparsers(dest="collections_command", required=True)
    mig = colls_sub.add_parser("migrate", help="copy every SQLite collection into PostgreSQL (resumable, verified)")
    mig.add_argument("--from", dest="source", required=True, help="DATA_ROOT holding collections/")
    mig.add_argument("--to", dest="target", required=True, help="postgresql://user:password@host:port/db")
    mig.add_argument("--media-root", help="the shared media root (default: DATA_ROOT/media)")
    mig.add_argument("--batch-size", type=int, default=500)
    mig.add_argument("--quiet", action="store_true", help="no progress bars")
    mig.set_defaults(func=_cmd_collections_migrate)
    return parser


def _cmd_collections_migrate(args: argparse.Namespace) -> int:
    from uniadapter_serve.service.collections.migrate import migrate

    root = Path(args.source)
    report = migrate(root, args.target, media_root=Path(args.media_root) if args.media_root else root / "media",
                     batch_size=args.batch_size, progress=not args.quiet)
    print(json.dumps(report, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except UniAdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
