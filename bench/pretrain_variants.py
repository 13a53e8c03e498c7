"""Which pre-training lets a small adapter read relations? The demo backbone pre-trained from one seed, data and
step count in each variant, then a retrieval UniAdapter set trained on each frozen result with the build's
settings and equal steps, side by side: the position probe (a lone shape's side from the frozen [CLS]), and
held-out text->image R@1 (the build's protocol, `adapters/demo/build.evaluate`) overall, on lone shapes' sides
and on two shapes' left/right relations.

Variants: BLIP's objectives with the layout objective (`LayoutHeads`: the shipped build's pre-training), and the
same with pre-training captions that name the shapes left to right (`Scene.pretrain_caption(ordered=True)`: the
order of the words binds each shape to its place; still no word for a side or a relation).

A variant costs ~0.4 s per pre-training step and ~0.26 s per set step on two cores; the defaults (600 + 500 steps)
take ~6 minutes each.

    .venv/bin/python bench/pretrain_variants.py
    .venv/bin/python bench/pretrain_variants.py --pretrain-steps 3000 --set-steps 2000
"""

from __future__ import annotations

import argparse
import time

import torch

from uniadapter_serve.adapters.datasets import demo_images
from uniadapter_serve.adapters.demo.build import GROUP_DRAW, TASK_LR, evaluate
from uniadapter_serve.adapters.demo.pretrain import pretrain
from uniadapter_serve.adapters.evaluation import position_probe
from uniadapter_serve.adapters.training import TrainConfig, train
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.tokenizer import BlipTokenizer

VARIANTS = (("layout objective", False), ("layout objective + captions left to right", True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--set-steps", type=int, default=500)
    p.add_argument("--layout-weight", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = World(seed=args.seed)
    tokenizer = BlipTokenizer.demo(512)
    sets_data = demo_images(world, "train", 20_000)
    print(f"# {args.pretrain_steps} pre-training steps (layout weight {args.layout_weight:g}), then a retrieval set "
          f"of {args.set_steps} steps, each variant; {torch.get_num_threads()} threads")
    rows = []
    for name, ordered in VARIANTS:
        started = time.monotonic()
        data = demo_images(world, "train", 20_000, pretraining=True, ordered=ordered)
        backbone, _ = pretrain(data, tokenizer, steps=args.pretrain_steps, seed=args.seed,
                               layout_weight=args.layout_weight, progress=False)
        probe = position_probe(backbone, world)
        cfg = TrainConfig(task="retrieval", mode="uniadapter", steps=args.set_steps, batch_size=32,
                          lr=TASK_LR["retrieval"], bottleneck=64, kv_rank=16, group_draw=GROUP_DRAW, seed=args.seed)
        result = train(backbone, tokenizer, sets_data, cfg, progress=False)
        m = evaluate("retrieval", backbone, tokenizer, result.adapter, world)
        rows.append((name, probe["cls"], m, time.monotonic() - started))
    print(f"{'pre-training':45s} {'probe':>6s} {'R@1 ITM/ITC':>12s} {'side':>6s} {'relation':>9s} {'seconds':>8s}")
    for name, probe_cls, m, seconds in rows:
        print(f"{name:45s} {probe_cls:6.3f} {m['itm_t2i_r@1']:5.3f}/{m['t2i_r@1']:5.3f} "
              f"{m['itm_t2i_r@1_side']:6.3f} {m['itm_t2i_r@1_relation']:9.3f} {seconds:8.0f}")


if __name__ == "__main__":
    main()
