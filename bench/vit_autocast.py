"""What DTYPE=auto's ViT autocast buys the served vision stage, side by side in one run (CPU).

The vision stage of `stages.make_stages` is called as the batcher calls it (uint8 payloads, ITC embeddings on) on
the float32 backbone twice per round, once with its ViT in float32 and once under bfloat16 autocast
(`VisionModel.bf16_from` = 1), for each workload: a batch of `--batch` images (a collection add's chunk), two
8-frame clips (VideoQA / a video add) and 8 images. Rounds interleave and rotate the order
(`benchkit.rotating_rounds`); printed per workload: the median of the per-round ratios float32 / autocast of the
process's CPU time per call (> 1: autocast is cheaper), with half the inter-quartile range. What to set
`VIT_BF16_FROM` to: the smallest batch at which it pays here (the demo on this 2-core machine: 8 frames).

    .venv/bin/python bench/vit_autocast.py                      # the demo model, 2 threads
    .venv/bin/python bench/vit_autocast.py --threads 1 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from benchkit import half_iqr, rotating_rounds

from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import VisionInput, make_stages
from uniadapter_serve.model.tokenizer import load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="demo")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="images in the ingest-sized batch")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=10, help="stage calls per sample")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.backbone, device=torch.device("cpu"), dtype=torch.float32).eval()
    stage = make_stages(backbone, load_tokenizer(args.backbone, backbone.config))["vision"]
    size = int(backbone.config.vision_config.image_size)
    gen = torch.Generator().manual_seed(0)

    def payloads(n: int, frames: int) -> list[VisionInput]:
        return [VisionInput(torch.randint(0, 256, (frames, 3, size, size), dtype=torch.uint8, generator=gen),
                            video=frames > 1) for _ in range(n)]

    workloads = {f"{args.batch} images (an add's chunk)": payloads(args.batch, 1),
                 "2 clips x 8 frames (VideoQA)": payloads(2, 8), "8 images": payloads(8, 1),
                 "4 images": payloads(4, 1), "1 image": payloads(1, 1)}
    vm = backbone.vision_model

    def sampler(batch: list[VisionInput], bf16_from: int | None):
        def sample() -> float:
            vm.bf16_from = bf16_from
            try:
                stage(batch, Routing.none(len(batch)))  # untimed: this variant's first call
                start = time.process_time()
                for _ in range(args.calls):
                    stage(batch, Routing.none(len(batch)))
                return (time.process_time() - start) / args.calls
            finally:
                vm.bf16_from = None
        return sample

    print(f"# ViT autocast: {args.backbone}, {args.threads} threads, {args.rounds} rounds of {args.calls} calls")
    with torch.inference_mode():
        for name, batch in workloads.items():
            fp32, low = rotating_rounds([sampler(batch, None), sampler(batch, 1)], args.rounds)
            ratios = [f / b for f, b in zip(fp32, low, strict=True)]
            print(f"  {name:32s} float32 {statistics.median(fp32) * 1e3:7.1f} ms CPU, autocast "
                  f"{statistics.median(low) * 1e3:7.1f} ms: {statistics.median(ratios):.2f}x "
                  f"± {half_iqr(ratios):.2f} (float32 / autocast)")


if __name__ == "__main__":
    main()
