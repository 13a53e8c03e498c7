"""Can the VQA path read where a shape is? On the shipped demo backbone (or `--backbone`), VQA is trained on one
question kind of lone-shape scenes only, a UniAdapter set and a full fine-tune at equal steps, and scored on
held-out scenes: "is the <shape> on the left or right" against "what colour is the <shape>" as the control.
Beside each score, how much the question states (`encode_multimodal`: the question cross-attending to the image)
and the answer decoder's first state (cross-attending to the question states; what the first answer word is read
from) vary across images (std over held-out images, mean over positions and channels), and the linear probe of the same
backbone's [CLS] and of the question's multimodal [CLS] (`position_probe`): a backbone whose image [CLS] reads a
side while its question states do not move with it keeps position where the VQA path does not look (the layout
objective alone: question probe 0.64, a set's side 0.51 after 300 steps, 0.75 after 1,000); the grounding
objective carries it into the question states (a backbone pre-trained with `build --grounding-weight 1`: question
probe 0.85, 300 side-only steps 0.94 for a set and 0.97 for a full fine-tune).

    .venv/bin/python bench/vqa_side.py                       # the shipped backbone, 300 steps each
    .venv/bin/python bench/vqa_side.py --backbone /tmp/build/backbone --steps 1000
    .venv/bin/python bench/vqa_side.py --set-lr 1e-2        # the shipped backbone's set: sides 0.92 (0.505 at 4e-3)

The learning rate decides whether a set trained on sides alone leaves the constant answer: on the shipped backbone,
300 steps at 1e-2 reach 0.92 and at 4e-3 stay at 0.505. The same learning rates in the build's mixed VQA training (all
five question kinds, 3,000 steps) leave sides at 0.504 (1e-2, 6e-3, and 1e-2 with side questions drawn 4x as often):
the set answers "right" to every side question, lone shapes (0.51) and pairs (0.50) alike.
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
def spreads(model, tokenizer, adapter, qas: list[QA]) -> tuple[float, float]:
    """How much (std across images, mean over positions and channels) the question states and the answer
    decoder's first state vary with the image."""
    size = int(vision_config(model.config).image_size)  # type: ignore[arg-type]
    routing = Routing.single(adapter, len(qas))
    _, states = visual(model, [q.media for q in qas], routing, size)
    ids, mask = tokenizer.encode([clean_text(q.question, 50) for q in qas], mode="multimodal")
    question = model.encode_multimodal(ids, mask, states, None, routing)
    first = model.decoder_states(torch.full((len(qas), 1), tokenizer.dec_id), None, question, mask, routing)
    return float(question.std(0).mean()), float(first.std(0).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="demo")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set-lr", type=float, default=1e-3, help="the set's learning rate (1e-2: sides 0.92 in 300 steps)")
    p.add_argument("--full-lr", type=float, default=3e-4)
    args = p.parse_args()
    backbone = load_backbone(args.backbone)
    tokenizer = load_tokenizer(args.backbone, backbone.config)
    world = World(seed=args.seed)
    probe = position_probe(backbone, world, tokenizer=tokenizer)
    print(f"# backbone {args.backbone}: probe of a lone shape's side from [CLS] {probe['cls']:.3f}, from the "
          f"question's multimodal [CLS] {probe['question']:.3f}, "
          f"{args.steps} steps per run, {torch.get_num_threads()} threads")
    print(f"{'questions':8s} {'run':11s} {'held-out accuracy':>18s} {'question-state spread':>22s} "
          f"{'answer-state spread':>20s} {'seconds':>8s}")
    for kind in ("side", "colour"):
        train_qas = lone_shape_questions(world, kind, 0, 3000)
        test_qas = lone_shape_questions(world, kind, SPLIT_OFFSETS["test"], 400)
        for mode, lr in (("uniadapter", args.set_lr), ("full", args.full_lr)):
            started = time.monotonic()
            cfg = TrainConfig(task="vqa", mode=mode, steps=args.steps, batch_size=32, lr=lr, bottleneck=64,
                              kv_rank=16, seed=args.seed)
            result = train(backbone, tokenizer, train_qas, cfg, progress=False)
            accuracy = float(np.mean(answer_scores(result.backbone, tokenizer, test_qas, ANSWERS, result.adapter)))
            question, answer = spreads(result.backbone, tokenizer, result.adapter, test_qas[:64])
            print(f"{kind:8s} {mode:11s} {accuracy:18.3f} {question:22.3f} {answer:20.3f} "
                  f"{time.monotonic() - started:8.0f}")


if __name__ == "__main__":
    main()
