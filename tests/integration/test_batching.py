"""Through the real server: concurrent requests for different sets share one batch and each gets
exactly what its set gives alone."""

from __future__ import annotations

import base64
import re
from concurrent.futures import ThreadPoolExecutor

from support.media import image_bytes


def mixed_batches(client, stage: str) -> float:
    text = client.get("/metrics").text
    m = re.search(rf'^uniadapter_mixed_batches_total{{stage="{stage}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_two_sets_in_one_batch_match_each_alone(client):
    png = base64.b64encode(image_bytes((10, 180, 40))).decode()
    requests = [{"image": png, "question": "what colour is the square?", "adapter": name, "top_k": 3}
                for name in ("vqa-a", "vqa-b")]
    alone = [client.post("/vqa", json=r).json() for r in requests]
    before = {s: mixed_batches(client, s) for s in ("vision", "answer")}
    with ThreadPoolExecutor(2) as pool:  # the server's max_wait_ms (150) lets both land in one batch
        together = list(pool.map(lambda r: client.post("/vqa", json=r).json(), requests))
    after = {s: mixed_batches(client, s) for s in ("vision", "answer")}
    assert after["vision"] >= before["vision"] + 1
    assert after["answer"] >= before["answer"] + 1
    for solo, mixed in zip(alone, together, strict=True):
        assert mixed["adapter"] == solo["adapter"]
        assert [a["answer"] for a in mixed["alternatives"]] == [a["answer"] for a in solo["alternatives"]]
        for x, y in zip(mixed["alternatives"], solo["alternatives"], strict=True):
            assert abs(x["score"] - y["score"]) <= 1e-4
    assert alone[0]["score"] != alone[1]["score"]  # the two sets really differ


def test_rank_greedy_and_beams_in_one_batch_match_each_alone(client):
    png = base64.b64encode(image_bytes((200, 40, 10))).decode()
    base = {"image": png, "question": "what colour is the square?", "top_k": 3}
    requests = [base | {"adapter": "vqa-a"},
                base | {"adapter": "vqa-b", "mode": "generate", "max_answer_length": 4},
                base | {"adapter": "vqa-a", "mode": "generate", "num_beams": 3, "max_answer_length": 5}]
    alone = [client.post("/vqa", json=r).json() for r in requests]
    before = mixed_batches(client, "answer")
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda r: client.post("/vqa", json=r).json(), requests))
    assert mixed_batches(client, "answer") >= before + 1
    for solo, mixed in zip(alone, together, strict=True):
        assert [a["answer"] for a in mixed["alternatives"]] == [a["answer"] for a in solo["alternatives"]]
        for x, y in zip(mixed["alternatives"], solo["alternatives"], strict=True):
            assert abs(x["score"] - y["score"]) <= 1e-4
    assert [len(x["alternatives"]) for x in alone] == [3, 1, 3]
