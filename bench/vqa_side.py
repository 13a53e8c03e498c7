"""Can the VQA path read where a shape is? On the shipped demo backbone (or `--backbone`), VQA is trained on one
question kind of lone-shape scenes only, a UniAdapter set and a full fine-tune at equal steps, and scored on
held-out scenes: "is the <shape> on the left or right" against "what colour is the <shape>" as the control.
Beside each score, how much the question states (`encode_multimodal`: the question cross-attending to the image)
vary across images (std over held-out images, mean over positions and channels), and the linear probe of the same
backbone's [CLS] (`position_probe`): a backbone whose [CLS] reads a side while its question states do not move
with it keeps position where the VQA path does not look.

    .venv/bin/python bench/vqa_side.py                       # the shipped backbone, 300 steps each
    .venv/bin/python bench/vqa_side.py --backbone /tmp/build/backbone --steps 1000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from uniadapter_serve.adapters.datasets import QA, SPLIT_OFFSETS
from uniadapter_serve.adapters.evaluation import answer_scores, position_probe
from uniadapter_serve.adapters.training import TrainConfig, train, visual
from uniadapter_serve.model.backbone import vision_config
from uniadapter_serve.model.demo.shipped import ANSWERS
from uniadapter_serve.model.demo.world import World, question_kind
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.tokenizer import clean_text, load_tokenizer


def lone_shape_questions(world: World, kind: str, start: int, n: int) -> list[QA]:
    out = []
    for i in range(start, start + n):
        scene = world.scene(i)
        if len(scene.shapes) != 1:
            continue
        pixels = np.asarray(world.render(scene))
        out += [QA(pixels, q, {a: 1.0}) for q, a in scene.questions() if question_kind(q) == kind]
    return out


@torch.inference_mode()
def question_spread(model, tokenizer, adapter, qas: list[QA]) -> float:
    size = int(vision_config(model.config).image_size)  # type: ignore[arg-type]
    routing = Routing.single(adapter, len(qas))
    _, states = visual(model, [q.media for q in qas], routing, size)
    ids, mask = tokenizer.encode([clean_text(q.question, 50) for q in qas], mode="multimodal")
    return float(model.encode_multimodal(ids, mask, states, None, routing).std(0).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    backbone = load_backbone(args.backbone)
    tokenizer = load_tokenizer(args.backbone, backbone.config)
    world = World(seed=args.seed)
    probe = position_probe(backbone, world)
    print(f"# backbone {args.backbone}: probe of a lone shape's side from [CLS] {probe['cls']:.3f}, "
          f"{args.steps} steps per run, {torch.get_num_threads()} threads")
    print(f"{'questions':8s} {'run':11s} {'held-out accuracy':>18s} {'question-state spread':>22s} {'seconds':>8s}")
    for kind in ("side", "colour"):
        train_qas = lone_shape_questions(world, kind, 0, 3000)
        test_qas = lone_shape_questions(world, kind, SPLIT_OFFSETS["test"], 400)
        for mode, lr in (("uniadapter", 1e-3), ("full", 3e-4)):
            started = time.monotonic()
            cfg = TrainConfig(task="vqa", mode=mode, steps=args.steps, batch_size=32, lr=lr, bottleneck=64,
                              kv_rank=16, seed=args.seed)
            result = train(backbone, tokenizer, train_qas, cfg, progress=False)
            accuracy = float(np.mean(answer_scores(result.backbone, tokenizer, test_qas, ANSWERS, result.adapter)))
            spread = question_spread(result.backbone, tokenizer, result.adapter, test_qas[:64])
            print(f"{kind:8s} {mode:11s} {accuracy:18.3f} {spread:22.3f} {time.monotonic() - started:8.0f}")


if __name__ == "__main__":
    main()
