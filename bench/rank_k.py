"""What BLIP's k = 128 costs in VQA rank mode, against k = 8, per request (CPU by default).

A request's model work, end to end: the image through the ViT, the question through the multimodal
encoder, then `rank_answers`: the first-token pass picks the top k of a VQA-v2-sized answer list (3,128
answers of 1-3 tokens), and the k candidates are scored in full. The question's cross-attention K/V are
computed once and broadcast across the k candidates (the target: k = 128 costs <= 2x k = 8). Beside them,
`k=128 copied` runs the path this project had before: the question states repeated k times and every
candidate scored against its own copy.

Variants run side by side in rotating rounds (benchkit.rotating_rounds); each sample is the mean over
enough requests to last `--min-time` seconds. Ratios are of medians, with the spread of the per-round
paired ratios.

    .venv/bin/python bench/rank_k.py                        # demo backbone, 1 and 8 requests per batch
    .venv/bin/python bench/rank_k.py --backbone blip-base --batches 1 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from benchkit import half_iqr, rotating_rounds

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.loading import DEMO_DIR, load_backbone, random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_answer_list, random_batch
from uniadapter_serve.model.vqa import answer_log_likelihood, rank_answers

ANSWERS = 3128
"""VQA v2's answer list size (BLIP's answer_list.json)"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="demo", help="'demo' (the shipped model) or a bundled config (random)")
    p.add_argument("--batches", default="1,8", help="requests per batch, comma-separated")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per sample")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU seconds, which waiting for a busy core does not inflate (with 1 thread)")
    return p.parse_args(argv)


def answer_list(backbone: BlipBackbone, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 5) ids [DEC] t1..tn [SEP] pad..., n random in 1..3, and their mask."""
    return random_answer_list(backbone.config, ANSWERS, seed, random_lengths=True)


def copied_rank(backbone: BlipBackbone, q: torch.Tensor, qmask: torch.Tensor, cand: torch.Tensor,
                cmask: torch.Tensor, k: int) -> torch.Tensor:
    """The earlier path: first-token pass, then question states repeated k times."""
    B = q.shape[0]
    bos = cand[:1, :1].expand(B, 1)
    first = torch.log_softmax(backbone.decoder_logits(bos, None, q, qmask)[:, 0].float(), -1)
    top = first.index_select(1, cand[:, 1]).topk(k, dim=1).indices.flatten()
    return answer_log_likelihood(backbone, q.repeat_interleave(k, 0), qmask.repeat_interleave(k, 0), cand[top],
                                 cmask[top]).view(B, k)


def request(backbone: BlipBackbone, batch: int, k: int, copied: bool) -> Callable[[], object]:
    b = random_batch(backbone, batch, seed=3)
    cand, cmask = answer_list(backbone)
    routing = Routing.none(batch)

    @torch.inference_mode()
    def run() -> object:
        states = backbone.encode_image(b.pixel_values, routing)
        q = backbone.encode_multimodal(b.input_ids, b.attention_mask, states, routing=routing)
        qmask = b.attention_mask
        if copied:
            return copied_rank(backbone, q, qmask, cand, cmask, k)
        return rank_answers(backbone, q, qmask, cand, cmask, k, routing)

    return run


def sample(call: Callable[[], object], min_time: float, clock: Callable[[], float]) -> float:
    """Seconds per call: the mean over calls filling min_time."""
    n, start = 0, clock()
    while True:
        call()
        n += 1
        elapsed = clock() - start
        if elapsed >= min_time:
            return elapsed / n


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = (load_backbone(DEMO_DIR) if args.backbone == "demo" else random_backbone(args.backbone)).eval()
    print(f"backbone {args.backbone}, {ANSWERS} answers, {args.threads} thread(s), {args.rounds} rounds, "
          f"{args.clock} clock")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = {"k=8": (8, False), "k=128": (128, False), "k=128 copied": (128, True)}
    for batch in (int(x) for x in args.batches.split(",")):
        calls = [request(backbone, batch, k, copied) for k, copied in variants.values()]
        for call in calls:  # warm up
            call()
        samples = rotating_rounds([lambda c=c: sample(c, args.min_time, clock) for c in calls], args.rounds)
        base = samples[0]
        print(f"\n{batch} request(s) per batch")
        for name, values in zip(variants, samples, strict=True):
            ratios = [v / b for v, b in zip(values, base, strict=True)]
            per_request = statistics.median(values) / batch * 1e3
            print(f"  {name:13s} {per_request:8.2f} ms/request   / k=8: {statistics.median(ratios):5.2f}x "
                  f"(± {half_iqr(ratios):.2f})")
        print("  target: k=128 <= 2.00x k=8")


if __name__ == "__main__":
    main()
