"""Model-level throughput and memory of the backbone in each dtype, side by side in one run.

For each dtype (default fp16 and bf16 on CUDA, fp32 on CPU): load BLIP (random weights of the bundled
config; `--backbone blip-base` by default), publish-free random adapter sets for retrieval, VQA and VideoQA
(bottleneck 128), then measure

- memory: the backbone alone, and with the three sets resident (CUDA allocator bytes);
- images/s: vision encoding + ITC embedding at batch 32 with a retrieval set (median of `--rounds`);
- VQA answers/s: vision + question encoding + ranking 128 candidate answers, batch 32, with a VQA set;

and prints the ratio of every dtype to the first. Run from the repository root:

    .venv/bin/python bench/gpu_throughput.py                       # CUDA: fp16 and bf16
    .venv/bin/python bench/gpu_throughput.py --device cpu --backbone blip-tiny --dtypes float32
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.model.vqa import rank_answers

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, rounds: int, warmup: int = 2) -> float:
    """Median seconds of `fn` over `rounds` (after warm-up), synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure(args: argparse.Namespace, name: str) -> dict[str, float]:
    device, dtype = torch.device(args.device), DTYPES[name]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = allocated(device)
    backbone = load_backbone(args.backbone, device=device, dtype=dtype)
    backbone_bytes = allocated(device) - before
    sets = {task: random_adapter(backbone, UniAdapterConfig.for_task(task, bottleneck=128, kv_rank=16), seed=i,
                                 std=0.02) for i, task in enumerate(("retrieval", "vqa", "videoqa"))}
    with_sets = allocated(device) - before
    vc = backbone.config.vision_config
    B = args.batch
    pixels = torch.randn(B, 3, vc.image_size, vc.image_size, device=device, dtype=dtype)
    vocab = int(backbone.config.text_config.vocab_size)
    ids = torch.randint(4, vocab, (B, 12), device=device)
    mask = torch.ones_like(ids)
    answers = torch.randint(4, vocab, (args.candidates, 4), device=device)
    answers[:, 0] = 1
    answer_mask = torch.ones_like(answers)
    retrieval, vqa = Routing.single(sets["retrieval"], B), Routing.single(sets["vqa"], B)

    @torch.inference_mode()
    def images() -> object:
        return backbone.image_features(backbone.encode_image(pixels, retrieval), retrieval)

    @torch.inference_mode()
    def answer() -> object:
        image = backbone.encode_image(pixels, vqa)
        q = backbone.encode_multimodal(ids, mask, image, routing=vqa)
        return rank_answers(backbone, q, mask, answers, answer_mask, args.k, vqa)

    image_s = timed(images, device, args.rounds)
    vqa_s = timed(answer, device, args.rounds)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
    return {"backbone_mb": backbone_bytes / 2**20, "with_sets_mb": with_sets / 2**20, "peak_mb": peak / 2**20,
            "images_per_s": B / image_s, "vqa_per_s": B / vqa_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="blip-base")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma-separated: float16,bfloat16,float32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=128, help="answers ranked per question")
    parser.add_argument("--k", type=int, default=128, help="candidates kept after the first-token pass")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    names = (args.dtypes or ("float16,bfloat16" if args.device.startswith("cuda") else "float32")).split(",")
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    rows = {name: measure(args, name) for name in names}
    first = rows[names[0]]
    print(f"\n{args.backbone}, batch {args.batch}, {args.candidates} candidate answers (k={args.k})")
    print(f"{'dtype':>10} {'backbone MB':>12} {'+3 sets MB':>11} {'peak MB':>9} {'images/s':>10} {'VQA/s':>9}")
    for name, r in rows.items():
        print(f"{name:>10} {r['backbone_mb']:12.0f} {r['with_sets_mb']:11.0f} {r['peak_mb']:9.0f} "
              f"{r['images_per_s']:10.1f} {r['vqa_per_s']:9.1f}")
    for name, r in list(rows.items())[1:]:
        print(f"{name} / {names[0]}: images/s {r['images_per_s'] / first['images_per_s']:.2f}x, "
              f"VQA/s {r['vqa_per_s'] / first['vqa_per_s']:.2f}x")


if __name__ == "__main__":
    main()
