"""Does pre-training keep position? The demo backbone pre-trained twice from the same seed, data and steps, once
with BLIP's objectives alone (ITC, ITM, captioning LM: how the shipped backbone was made) and once with the
layout objective added (`adapters/losses.LayoutHeads`: the shapes' centres from the image [CLS], each patch's
place from its state; no caption names a side), then probed side by side: a linear probe (ridge regression,
`adapters/evaluation.position_probe`) reads a lone shape's side from the frozen [CLS] state and from the mean of
the patch states (chance 0.5; issue 26 asks >= 0.9). The shipped backbone is probed too, as the reference.

Pre-training costs ~0.6 s per step of batch 64 on two cores; the default 600 steps is a fifth of the shipped
3,000 (the probe of the shipped backbone shows what more steps of the plain objectives give).

    .venv/bin/python bench/position_probe.py                    # 600 steps each, layout weight 1
    .venv/bin/python bench/position_probe.py --steps 3000 --layout-weight 0.5
"""

from __future__ import annotations

import argparse
import time

import torch

from uniadapter_serve.adapters.datasets import demo_images
from uniadapter_serve.adapters.demo.pretrain import pretrain
from uniadapter_serve.adapters.evaluation import position_probe
from uniadapter_serve.model.demo.world import World
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--layout-weight", type=float, default=1.0)
    p.add_argument("--scenes", type=int, default=20_000, help="pre-training scenes (the build's 20,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    world = World(seed=args.seed)
    shipped = load_backbone("demo")
    tokenizer = load_tokenizer("demo", shipped.config)
    print(f"# position probe: {args.steps} pre-training steps each, layout weight {args.layout_weight}, "
          f"{torch.get_num_threads()} threads")
    rows = [("shipped backbone (3,000 steps, BLIP's objectives)", position_probe(shipped, world), 0.0, [])]
    data = demo_images(world, "train", args.scenes, pretraining=True)
    for name, weight in (("BLIP's objectives", 0.0), (f"+ layout x {args.layout_weight:g}", args.layout_weight)):
        started = time.monotonic()
        model, losses = pretrain(data, tokenizer, steps=args.steps, seed=args.seed, layout_weight=weight,
                                 progress=False)
        rows.append((f"{name} ({args.steps} steps)", position_probe(model, world), time.monotonic() - started,
                     losses))
    print(f"{'backbone':55s} {'CLS':>6s} {'mean patches':>13s} {'loss (last 20)':>15s} {'seconds':>8s}")
    for name, probe, seconds, losses in rows:
        tail = f"{sum(losses[-20:]) / len(losses[-20:]):.3f}" if losses else "-"
        print(f"{name:55s} {probe['cls']:6.3f} {probe['mean_patches']:13.3f} {tail:>15s} {seconds:8.0f}")


if __name__ == "__main__":
    main()
