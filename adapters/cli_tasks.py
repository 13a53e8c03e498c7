"""`uniadapter train` and `uniadapter eval`: data selection and reporting around
`adapters.training.train` and `adapters.evaluation` (the CLI parses, this module does the work)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uniadapter_serve.adapters.datasets import (
    demo_images,
    demo_videoqa,
    demo_vqa,
    read_karpathy,
    read_msrvtt,
    read_msrvtt_qa,
    read_vqa_v2,
)
from uniadapter_serve.adapters.evaluation import K_TEST, answer_accuracy, retrieval_recall
from uniadapter_serve.adapters.format import BackboneInfo, load_adapter_set, save_adapter_set
from uniadapter_serve.adapters.golden import GOLDEN_FILE, Prober, write_record
from uniadapter_serve.adapters.training import TrainConfig, train
from uniadapter_serve.errors import ConfigError
from uniadapter_serve.model.backbone import vision_config
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.tokenizer import default_answer_list, load_answer_list, load_tokenizer


def load_data(task: str, split: str, *, data: str, n: int, image_size: int, seed: int,
              annotations: str | None = None, questions: str | None = None,
              media_root: str | None = None, num_frames: int = 8, video_list: str | None = None) -> list[Any]:
    """`data`: 'demo' (the generated world), 'karpathy' (COCO/Flickr JSON), 'vqa2' (VQA v2 JSON),
    'msrvtt' (MSRVTT captions: the release JSON, the 1k-A test file as JSON lines / JSON list / CSV; with
    `video_list`, a 9k/7k train list, those videos only) or 'msrvtt-qa' (MSRVTT-QA JSON); real data reads
    media under `media_root`."""
    if data == "demo":
        world = World(seed=seed, image_size=image_size)
        if task == "retrieval":
            return demo_images(world, split, n)
        if task == "vqa":
            return demo_vqa(world, split, n)
        return demo_videoqa(world, split, n, num_frames)
    if media_root is None:
        raise ConfigError(f"--media-root is needed for {data} data")
    if data == "karpathy" and task == "retrieval":
        if annotations is None:
            raise ConfigError("--annotations (the Karpathy JSON) is needed")
        return read_karpathy(annotations, media_root, split=split)[:n]
    if data == "vqa2" and task == "vqa":
        if questions is None:
            raise ConfigError("--questions (and optionally --annotations) are needed for VQA v2")
        return read_vqa_v2(questions, annotations, media_root)[:n]
    if data == "msrvtt" and task == "retrieval":
        if annotations is None:
            raise ConfigError("--annotations (the MSRVTT captions file) is needed")
        return read_msrvtt(annotations, media_root, split=split, video_list=video_list)[:n]
    if data == "msrvtt-qa" and task == "videoqa":
        if questions is None:
            raise ConfigError("--questions (the MSRVTT-QA JSON of this split) is needed")
        return read_msrvtt_qa(questions, media_root)[:n]
    raise ConfigError(f"data {data!r} does not fit task {task!r} (demo: all tasks; karpathy, msrvtt: retrieval; "
                      "vqa2: vqa; msrvtt-qa: videoqa)")


def run_train(args: Any) -> dict[str, Any]:
    backbone = load_backbone(args.backbone)
    tokenizer = load_tokenizer(args.backbone, backbone.config)
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    items = load_data(args.task, "train", data=args.data, n=args.examples, image_size=size, seed=args.seed,
                      annotations=args.annotations, questions=args.questions, media_root=args.media_root,
                      num_frames=args.num_frames, video_list=getattr(args, "video_list", None))
    cfg = TrainConfig(task=args.task, mode=args.mode, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      bottleneck=args.bottleneck, kv_rank=args.kv_rank, num_frames=args.num_frames, seed=args.seed,
                      temporal=args.data == "msrvtt")
    result = train(backbone, tokenizer, items, cfg, checkpoint_dir=Path(args.out) / ".checkpoint",
                   progress=not args.quiet)
    report: dict[str, Any] = {"task": args.task, "mode": args.mode, "steps": len(result.losses),
                              "first_loss": result.losses[0] if result.losses else None,
                              "last_loss": result.losses[-1] if result.losses else None,
                              "tunable_parameters": result.tunable_parameters}
    if result.adapter is not None:
        answers = None if args.task == "retrieval" else load_answer_list(args.answer_list) if args.answer_list else \
            sorted({a for q in items for a in q.answers})
        version = save_adapter_set(result.adapter, args.out, name=args.name, backbone=BackboneInfo.of(backbone),
                                   answer_list=answers, extra={"train": cfg.__dict__})
        # the record of the set as a server loads it, on the backbone it was trained on
        saved = load_adapter_set(args.out, backbone)
        prober = Prober(backbone, tokenizer, default_answers(args.backbone))
        write_record(args.out, prober.record(saved.module, ref=saved.meta.ref, answer_list=saved.meta.answer_list))
        report.update(adapter_set=str(args.out), version=version, golden=str(Path(args.out) / GOLDEN_FILE))
    return report


default_answers = default_answer_list


def run_eval(args: Any) -> dict[str, Any]:
    backbone = load_backbone(args.backbone)
    tokenizer = load_tokenizer(args.backbone, backbone.config)
    loaded = load_adapter_set(args.adapter, backbone) if args.adapter else None
    adapter = loaded.module if loaded else None
    size = int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]
    frames = loaded.meta.config.num_frames if loaded else args.num_frames
    items = load_data(args.task, args.split, data=args.data, n=args.examples, image_size=size, seed=args.seed,
                      annotations=args.annotations, questions=args.questions, media_root=args.media_root,
                      num_frames=frames, video_list=getattr(args, "video_list", None))
    report: dict[str, Any] = {"task": args.task, "adapter": loaded.meta.ref if loaded else None, "examples": len(items)}
    if args.task == "retrieval":
        # the paper's protocol: every caption, ITM over the ITC top K_TEST (the ITC-only figures come with it)
        report["captions"] = sum(len(it.captions) for it in items)
        report.update(retrieval_recall(backbone, tokenizer, items, adapter, num_frames=frames, rerank_k=K_TEST))
    else:
        answers = (loaded.meta.answer_list if loaded and loaded.meta.answer_list else
                   sorted({a for q in items for a in q.answers}))
        report["accuracy"] = answer_accuracy(backbone, tokenizer, items, answers, adapter, num_frames=frames)
    return report


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, default=str)
