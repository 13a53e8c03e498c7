"""Build the shipped demo: pre-train the tiny BLIP, train the UniAdapter sets, evaluate the paper's
comparison in miniature (heads only / UniAdapter / full fine-tuning), and write everything under
`model/demo/` (the backbone and each set with its golden record, `golden.json`). Reproducible from the seed:

    python -m uniadapter_serve.adapters.demo.build --seed 0

Stages can run separately (`--stage pretrain|adapters|baselines`, `--tasks ...`, `--modes ...`), also side by
side in several processes (one thread each: OMP_NUM_THREADS=1); each run merges its row into `results.json`,
and a new backbone discards the sets and rows trained on the old one. Each finished run keeps its weights under
`.runs/` (not shipped), and `--stage evaluate` scores the kept runs again as `evaluate` scores now (a new figure or
protocol, no training).

Step counts (not wall time) define the run, so the same seed gives the same weights (up to float-reduction
order across thread counts); the learning-rate schedules decay over exactly those steps, and an interrupted
stage resumes from its last checkpoint. On two CPU cores pre-training runs at ~2-2.6 steps/s with two threads
(3,000 steps: 25 min); then two processes of one thread each side by side (`--stage adapters` then `--stage
baselines --modes heads`, beside `--stage baselines --modes full`) train a set at ~3.9 (retrieval), ~5.8 (VQA)
and ~1.6 (VideoQA, 4-frame clips) steps/s, full fine-tuning at 3.4 / 4.3 / 1.3, heads only at 9.8 / 15 / 4.5:
the nine runs in ~45 min, the whole build in ~70.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from uniadapter_serve.adapters.datasets import demo_images, demo_videoqa, demo_vqa
from uniadapter_serve.adapters.demo.pretrain import pretrain
from uniadapter_serve.adapters.evaluation import (
    DEMO_MOMENT_FIRST,
    answer_scores,
    by_kind,
    demo_timed_videos,
    long_video_recall,
    position_probe,
    retrieval_recall,
)
from uniadapter_serve.adapters.format import CONFIG_FILE, BackboneInfo, load_adapter_set, save_adapter_set
from uniadapter_serve.adapters.golden import GoldenRecord, Prober, write_record
from uniadapter_serve.adapters.training import TrainConfig, freeze_check, train, trained_from
from uniadapter_serve.model.demo.shipped import ANSWERS, DEMO_ROOT, SET_NAMES
from uniadapter_serve.model.demo.world import World, caption_kind, question_kind
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.preprocess import write_preprocessor_config
from uniadapter_serve.model.tokenizer import BlipTokenizer, load_answer_list, load_tokenizer

log = logging.getLogger(__name__)

TASKS = ("retrieval", "vqa", "videoqa")
RERANK_K = 16
"""retrieval is scored by the paper's protocol: each query's ITC top-k re-ranked by the ITM logit alone (and
by ITC alone)"""
TASK_STEPS = {"retrieval": 2000, "vqa": 3000, "videoqa": 1200}
"""per run: the UniAdapter set and both baselines get the same steps"""
TASK_LR = {"retrieval": 4e-3, "vqa": 1e-3, "videoqa": 4e-3}
"""the sets' learning rates (heads only: 1e-3, full fine-tuning: 2e-4). At 1e-3, retrieval scored R@1 0.47 and VideoQA
0.75 (direction of motion 0.00: "which way does the square move" was answered "move")"""
ITM_SCORE = "log_odds"
"""retrieval's ITM re-ranking orders by the match probability (its log-odds), as the service re-ranks, so the table
is what a user of /retrieve gets; BLIP's evaluation code orders by the match logit alone (`retrieval_recall`'s
"match_logit", for comparing a real checkpoint with the paper)"""
GROUP_DRAW = 4
"""retrieval batches of 8 families x 4 scenes: each scene has 3 in-batch negatives that differ only in layout"""
VIDEO_FRAMES = 4
"""frames per VideoQA clip (a move or a colour change reads from 4)"""
EVAL_SIZES = {"retrieval": 500, "vqa": 300, "videoqa": 300}
"""held-out scenes (retrieval: a gallery, its captions the queries; VQA: each scene's questions) and clips (VideoQA)
of each task's evaluation: the question kinds that decide the targets (a lone shape's side, direction of motion)
are a fifth to a third of the questions, so a few hundred of each keep their sampling error near 0.03"""
RETRIEVAL_GALLERIES = 4
"""retrieval is scored on this many disjoint held-out galleries of EVAL_SIZES["retrieval"] scenes and averaged: one
gallery of 63 families scores anywhere in 0.55-0.69 (the shipped set), as its families happen to be easy or hard"""


def write_backbone(model: Any, tokenizer: BlipTokenizer, folder: Path) -> None:
    """Weights, config, answer list and what `BlipProcessor.from_pretrained(folder)` reads (tokenizer files with
    [DEC]/[ENC] registered, preprocessor_config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    write_processing_files(tokenizer, folder, int(model.config.vision_config.image_size))
    (folder / "answer_list.json").write_text(json.dumps(ANSWERS) + "\n")


def write_processing_files(tokenizer: BlipTokenizer, folder: Path, image_size: int) -> None:
    """The tokenizer and preprocessor files alone (they can be rewritten without touching the weights)."""
    tokenizer.save(folder)
    write_preprocessor_config(folder, image_size)


def write_golden(out: Path, subjects: Sequence[str]) -> dict[str, GoldenRecord]:
    """golden.json beside the backbone (subject "backbone") and in each named set's folder (out/adapters/<name>/v1),
    computed as a server started on `out/backbone` recomputes them: its backbone, tokenizer and default answer list
    (answer_list.json) as loaded from that folder, float32 on the CPU."""
    folder = out / "backbone"
    backbone = load_backbone(folder)
    prober = Prober(backbone, load_tokenizer(folder, backbone.config), load_answer_list(folder / "answer_list.json"))
    written = {}
    for subject in subjects:
        if subject == "backbone":
            record = prober.record()
            write_record(folder, record)
        else:
            loaded = load_adapter_set(out / "adapters" / subject / "v1", backbone)
            record = prober.record(loaded.module, ref=loaded.meta.ref, answer_list=loaded.meta.answer_list)
            write_record(loaded.meta.path, record)
        written[subject] = record
    return written


def evaluate(task: str, backbone: Any, tok: BlipTokenizer, adapter: Any, world: World) -> dict[str, float]:
    if task == "retrieval":
        size = EVAL_SIZES["retrieval"]
        scenes = demo_images(world, "test", size * RETRIEVAL_GALLERIES)
        runs = [retrieval_recall(backbone, tok, items, adapter, rerank_k=RERANK_K, itm_score=ITM_SCORE,
                                 caption_kinds=[caption_kind(c) for it in items for c in it.captions])
                for items in (scenes[g * size:(g + 1) * size] for g in range(RETRIEVAL_GALLERIES))]
        return {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    qas = (demo_vqa(world, "test", EVAL_SIZES["vqa"]) if task == "vqa" else
           demo_videoqa(world, "test", EVAL_SIZES["videoqa"], VIDEO_FRAMES))
    scores = answer_scores(backbone, tok, qas, ANSWERS, adapter, num_frames=VIDEO_FRAMES)
    kinds = by_kind(scores, [question_kind(q.question) for q in qas])
    return {"accuracy": sum(scores) / len(scores), **{f"accuracy_{k.replace(' ', '_')}": v for k, v in kinds.items()}}


def read_results(out: Path) -> dict[str, Any]:
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {"tasks": {}}


def write_results(out: Path, results: dict[str, Any]) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out / "results.json")


def write_row(out: Path, task: str, mode: str, row: dict[str, Any]) -> None:
    """Merge one row into results.json as it is on disk now (stages of other tasks may run side by side)."""
    results = read_results(out)
    results["tasks"].setdefault(task, {})[mode] = row
    write_results(out, results)


def run_pretrain(args: argparse.Namespace, world: World, tok: BlipTokenizer) -> None:
    started = time.monotonic()
    model, losses = pretrain(demo_images(world, "train", 20_000, pretraining=True, ordered=args.ordered_captions),
                             tok, steps=args.pretrain_steps, batch_size=64, seed=args.seed,
                             layout_weight=args.layout_weight, grounding_weight=args.grounding_weight,
                             group_draw=args.pretrain_group_draw)
    tail = losses[-20:]
    log.info("pre-trained %d steps in %.0f s, loss %.3f -> %.3f", len(losses), time.monotonic() - started,
             losses[0], sum(tail) / len(tail))
    write_backbone(model, tok, args.out / "backbone")
    write_golden(args.out, ["backbone"])
    results = {"tasks": {}, "seed": args.seed,
               "backbone": {"pretrain_steps": len(losses), "layout_weight": args.layout_weight,
                            "grounding_weight": args.grounding_weight,
                            "ordered_captions": args.ordered_captions, "group_draw": args.pretrain_group_draw,
                            "position_probe": position_probe(model, world, tokenizer=tok),
                            "seconds": round(time.monotonic() - started),
                            "parameters": load_backbone(args.out / "backbone").component_parameters()}}
    write_results(args.out, results)  # a new backbone invalidates every set trained on the old one
    shutil.rmtree(args.out / "adapters", ignore_errors=True)


def train_sets(args: argparse.Namespace, world: World, tok: BlipTokenizer, modes: list[str]) -> None:
    backbone = load_backbone(args.out / "backbone")
    unchanged = freeze_check(backbone)
    for task in args.tasks:
        data: list[Any] = (demo_images(world, "train", 20_000) if task == "retrieval" else
                           demo_vqa(world, "train", 8_000) if task == "vqa" else
                           demo_videoqa(world, "train", 3_000, VIDEO_FRAMES))
        for mode in modes:
            cfg = run_config(args, task, mode)
            with_time = time.monotonic()
            result = train(backbone, tok, data, cfg, progress=True,
                           checkpoint_dir=args.out / ".checkpoints" / f"{task}-{mode}")
            metrics = evaluate(task, result.backbone, tok, result.adapter, world)
            base = sum(backbone.component_parameters()[c] for c in
                       (("vision_model", "text_encoder", "heads") if task == "retrieval" else
                        ("vision_model", "text_encoder", "text_decoder")))
            # full fine-tuning trains every parameter the task uses (the copy's unused parts get no gradient)
            tunable = base if mode == "full" else result.tunable_parameters
            row = {"metrics": metrics, "tunable_parameters": tunable,
                   "percent": round(100 * tunable / base, 2), "steps": cfg.steps, "lr": cfg.lr,
                   **({"resumed_at": cfg.steps - len(result.losses)} if len(result.losses) < cfg.steps else {}),
                   "loss_first": round(result.losses[0], 4),
                   "loss_last": round(sum(result.losses[-20:]) / len(result.losses[-20:]), 4),
                   "seconds": round(time.monotonic() - with_time)}
            log.info("%s/%s: %s", task, mode, row)
            if mode == "uniadapter":
                assert result.adapter is not None
                folder = args.out / "adapters" / SET_NAMES[task]
                shutil.rmtree(folder, ignore_errors=True)
                save_adapter_set(result.adapter, folder / "v1", name=SET_NAMES[task],
                                 backbone=BackboneInfo.of(backbone),
                                 answer_list=None if task == "retrieval" else ANSWERS,
                                 extra={"trained_on": "demo world", "metrics": metrics, "seed": args.seed,
                                        "steps": len(result.losses)})
                write_golden(args.out, [SET_NAMES[task]])
            write_row(args.out, task, mode, row)
            keep_run(args.out, task, mode)
    assert unchanged(), "training changed the shared backbone"


MOMENT_VIDEOS = 100
"""held-out long videos (from DEMO_MOMENT_FIRST) of the moment-retrieval figure"""


def write_moment_figures(out: Path, world: World, tok: BlipTokenizer) -> None:
    """results.json's `moment_retrieval`: the shipped retrieval set (and the bare backbone) finding the events of
    MOMENT_VIDEOS long videos among their moments (windows of 8 s every 4 s, as `demo-long-videos` is indexed):
    moment R@1 at IoU 0.5 within each video and over the whole corpus."""
    started = time.monotonic()
    backbone = load_backbone(out / "backbone")
    loaded = load_adapter_set(out / "adapters" / SET_NAMES["retrieval"] / "v1", backbone)
    fps, window_s, stride_s, frames = 2, 8.0, 4.0, 8
    videos = demo_timed_videos(world, MOMENT_VIDEOS, fps=fps)
    with_set = long_video_recall(backbone, tok, videos, loaded.module, window_s, stride_s, frames)
    bare = long_video_recall(backbone, tok, videos, None, window_s, stride_s, frames)
    figures = {k: with_set[k] for k in ("moment_r@1_iou0.5", "corpus_moment_r@1_iou0.5", "oracle_iou0.5")}
    results = read_results(out)
    results["moment_retrieval"] = {
        "videos": len(videos), "first_index": DEMO_MOMENT_FIRST, "fps": fps, "window_s": window_s,
        "stride_s": stride_s, "num_frames": frames, "events": int(with_set["queries"]),
        "moments": int(with_set["moments"]), "seconds_of_video": sum(v.duration_s for v in videos),
        "adapter": loaded.meta.ref, "metrics": figures,
        "backbone_only": {k: bare[k] for k in ("moment_r@1_iou0.5", "corpus_moment_r@1_iou0.5")},
        "seconds": round(time.monotonic() - started, 1), "threads": torch.get_num_threads()}
    log.info("moments: %s (bare backbone %s)", figures, results["moment_retrieval"]["backbone_only"])
    write_results(out, results)


def run_config(args: argparse.Namespace, task: str, mode: str) -> TrainConfig:
    lr = (args.lr or TASK_LR[task]) if mode == "uniadapter" else 1e-3 if mode == "heads" else 2e-4
    return TrainConfig(task=task, mode=mode, steps=args.task_steps or TASK_STEPS[task], batch_size=32, lr=lr,
                       bottleneck=args.bottleneck, kv_rank=16, num_frames=VIDEO_FRAMES if task == "videoqa" else 8,
                       group_draw=GROUP_DRAW, checkpoint_every=50, seed=args.seed)


RUNS = ".runs"
"""under the output folder: each finished run's trained weights (`<task>-<mode>/weights.safetensors`), so that
`--stage evaluate` can score every row again (a new protocol, a new figure) without training again; not shipped"""


def keep_run(out: Path, task: str, mode: str) -> None:
    """The finished run's last checkpoint (its final weights: every step count is a multiple of the checkpoint
    interval) moves to RUNS; its optimizer state goes."""
    checkpoint = out / ".checkpoints" / f"{task}-{mode}"
    kept = out / RUNS / f"{task}-{mode}"
    kept.mkdir(parents=True, exist_ok=True)
    (checkpoint / "weights.safetensors").replace(kept / "weights.safetensors")
    shutil.rmtree(checkpoint, ignore_errors=True)


def rescore(args: argparse.Namespace, world: World, tok: BlipTokenizer, modes: list[str]) -> None:
    """Evaluate every kept run again (`evaluate` as it is now) and replace its row's metrics, the rest of the row
    (steps, losses, time) as trained; a UniAdapter set's metadata (`extra.metrics` of its config) gets the new
    figures too (its version is its weights' hash: unchanged)."""
    backbone = load_backbone(args.out / "backbone")
    for task in args.tasks:
        for mode in modes:
            weights = args.out / RUNS / f"{task}-{mode}" / "weights.safetensors"
            row = read_results(args.out)["tasks"].get(task, {}).get(mode)
            if row is None or not weights.is_file():
                log.warning("%s/%s: no kept run to score again (train it first)", task, mode)
                continue
            model, adapter = trained_from(backbone, run_config(args, task, mode), weights)
            row["metrics"] = evaluate(task, model, tok, adapter, world)
            log.info("%s/%s scored again: %s", task, mode, row["metrics"])
            write_row(args.out, task, mode, row)
            config = args.out / "adapters" / SET_NAMES[task] / "v1" / CONFIG_FILE
            if mode == "uniadapter" and config.is_file():
                doc = json.loads(config.read_text())
                doc.setdefault("extra", {})["metrics"] = row["metrics"]
                config.write_text(json.dumps(doc, indent=2) + "\n")


MODE_LABELS = {"heads": "frozen backbone + heads only", "uniadapter": "UniAdapter", "full": "full fine-tuning"}


def _fig(metrics: dict[str, float], key: str) -> str:
    return f"{metrics[key]:.2f}" if key in metrics else "-"


def results_table(results: dict[str, Any]) -> str:
    """The README's comparison table (markdown), from results.json."""
    head = ("| method | retrieval: tunable % | text->image R@1, ITM re-rank / ITC only (side; relation) "
            "| VQA: tunable % | VQA exact match (left/right) | VideoQA: tunable % | VideoQA accuracy (direction) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    tasks = results["tasks"]
    for mode, label in MODE_LABELS.items():
        cells = [label]
        for task in TASKS:
            row = tasks.get(task, {}).get(mode)
            if row is None:
                cells += ["-", "-"]
                continue
            m = row["metrics"]
            score = (f"{m['itm_t2i_r@1']:.2f} / {m['t2i_r@1']:.2f} ({_fig(m, 'itm_t2i_r@1_side')}; "
                     f"{_fig(m, 'itm_t2i_r@1_relation')})" if task == "retrieval" else
                     f"{m['accuracy']:.2f} ({_fig(m, 'accuracy_side' if task == 'vqa' else 'accuracy_direction')})")
            cells += [f"{row['percent']:.2f} %", score]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEMO_ROOT)
    parser.add_argument("--stage", choices=("all", "pretrain", "adapters", "baselines", "evaluate"), default="all",
                        help="all = pretrain, then the adapter sets, then the baselines; evaluate = score the kept "
                             "runs again")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--modes", nargs="+", choices=tuple(MODE_LABELS), default=list(MODE_LABELS),
                        help="train only these runs of the stages chosen (e.g. split the baselines between processes)")
    parser.add_argument("--pretrain-steps", type=int, default=3000)
    parser.add_argument("--layout-weight", type=float, default=1.0,
                        help="weight of the layout objective in pre-training (0: BLIP's three objectives alone)")
    parser.add_argument("--grounding-weight", type=float, default=0.0,
                        help="weight of the grounding objective in pre-training (0, the shipped build: none; 1 "
                             "moves VQA left/right 0.50 -> 0.62 and costs colour 0.89 -> 0.78 and shape 0.83 -> "
                             "0.63; 0.3 keeps colour and shape and leaves left/right at 0.50: see README)")
    parser.add_argument("--ordered-captions", action="store_true",
                        help="pre-training captions name the shapes left to right (still no word for a side)")
    parser.add_argument("--pretrain-group-draw", type=int, default=1,
                        help="pre-training batches draw this many scenes of a family together (1: uniform)")
    parser.add_argument("--task-steps", type=int, help=f"per run, set and baselines alike (default: {TASK_STEPS})")
    parser.add_argument("--lr", type=float, help=f"the sets' learning rate (default: {TASK_LR})")
    parser.add_argument("--bottleneck", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    world = World(seed=args.seed)
    tok = BlipTokenizer.demo(512)
    started = time.monotonic()
    if args.stage in ("all", "pretrain"):
        run_pretrain(args, world, tok)
    if args.stage in ("all", "adapters") and "uniadapter" in args.modes:
        train_sets(args, world, tok, ["uniadapter"])
    if args.stage in ("all", "baselines"):
        train_sets(args, world, tok, [m for m in ("heads", "full") if m in args.modes])
    if args.stage == "evaluate":
        rescore(args, world, tok, list(args.modes))
    if args.stage in ("all", "adapters", "evaluate") and "retrieval" in args.tasks and "uniadapter" in args.modes:
        write_moment_figures(args.out, world, tok)
    log.info("done in %.0f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
