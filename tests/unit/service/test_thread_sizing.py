"""How much work a batch's forward step does, which decides whether it is split across intra-op threads."""

from __future__ import annotations

import torch

from uniadapter_serve.model.loading import load_config
from uniadapter_serve.model.stages import (
    AnswerInput,
    AnswerStage,
    GeneratePlan,
    MatchStage,
    RankPlan,
    TextInput,
    TextStage,
    VisionInput,
    VisionStage,
)
from uniadapter_serve.service.settings import Settings

THRESHOLD = Settings().parallel_min_mmacs * 1e6
STAGES = {"vision": VisionStage, "text": TextStage, "itm": MatchStage, "answer": AnswerStage}


def step_macs(config, stage, payloads):
    return STAGES[stage].macs(config, payloads)


def answers(n: int, **kw) -> list[AnswerInput]:
    ids = torch.ones(8, dtype=torch.long)
    plan = (RankPlan((ids[None], ids[None]), k=kw.get("rank_k", 1), top_k=1) if kw.get("mode") == "rank"
            else GeneratePlan(num_beams=kw.get("num_beams", 1)))
    return [AnswerInput("what is it", torch.zeros(1), plan) for _ in range(n)]


def test_step_work_scales_with_rows_and_splits_where_it_was_measured_to_pay():
    demo, base = load_config("blip-demo"), load_config("blip-base")
    # measured on 2 cores: the demo decoder at 32 rows is slower on 2 threads, BLIP-base's at 1 row 2x faster
    assert step_macs(demo, "answer", answers(32)) < THRESHOLD
    assert step_macs(base, "answer", answers(1)) > THRESHOLD
    # the demo ViT: one image alone stays on one thread, a few split
    one = VisionInput(torch.zeros(1, 3, 64, 64))
    assert step_macs(demo, "vision", [one]) < THRESHOLD < step_macs(demo, "vision", [one] * 2)
    # work grows with rows: beams, rank candidates, video frames, tokens
    assert step_macs(demo, "answer", answers(2, num_beams=3)) == 3 * step_macs(demo, "answer", answers(2))
    assert step_macs(demo, "answer", answers(1, mode="rank", rank_k=128)) == 128 * step_macs(demo, "answer",
                                                                                               answers(1))
    clip = VisionInput(torch.zeros(8, 3, 64, 64), video=True)
    assert step_macs(demo, "vision", [clip]) == 8 * step_macs(demo, "vision", [one])
    text = TextInput("a b c d e f g h")  # 10 tokens with [CLS] and [SEP]
    assert step_macs(demo, "text", [text] * 4) == 4 * step_macs(demo, "text", [text])
    assert step_macs(demo, "itm", [text]) > step_macs(demo, "text", [text])
