"""A set cannot raise the server's limits: publishing one whose `extra.rank_k` or answer list is over
MAX_RANK_K / MAX_ANSWER_LIST is refused with a 409 naming the field and the setting, and a set already on disk
that asks for more cannot make a request exceed them (rank_k clamped, an answer list over the cap refused)."""

from __future__ import annotations

import base64

import httpx
import pytest
from pydantic import ValidationError
from support.inprocess import start_in_process
from support.media import image_bytes
from support.server import ANSWERS, publish_test_sets

from uniadapter_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, BackboneInfo, save_adapter_set
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.service.settings import Settings

PNG = base64.b64encode(image_bytes()).decode()


def vqa_module(backbone, seed: int):
    return random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), seed=seed)


@pytest.mark.parametrize(("answers", "extra", "field", "setting"), [
    (ANSWERS, {"rank_k": 100_000}, "extra.rank_k is 100,000", "limit of 1,024 (MAX_RANK_K)"),
    ([f"a{i}" for i in range(100_000)], None, "answer list has 100,000 answers",
     "limit of 20,000 (MAX_ANSWER_LIST)"),
], ids=["rank-k", "answer-list"])
def test_publishing_a_set_over_a_limit_is_refused(admin, tmp_path, answers, extra, field, setting):
    """The defaults of the shared server (MAX_RANK_K 1,024, MAX_ANSWER_LIST 20,000)."""
    backbone = load_backbone("blip-tiny")
    name = "greedy-" + field.split()[0].replace(".", "-")
    save_adapter_set(vqa_module(backbone, 500), tmp_path / "set", name=name, backbone=BackboneInfo.of(backbone),
                     answer_list=answers, extra=extra)
    files = {"config": (CONFIG_FILE, (tmp_path / "set" / CONFIG_FILE).read_bytes()),
             "weights": (WEIGHTS_FILE, (tmp_path / "set" / WEIGHTS_FILE).read_bytes())}
    r = admin.post(f"/adapters/{name}/publish", files=files)
    assert r.status_code == 409, r.text
    assert field in r.json()["detail"] and setting in r.json()["detail"], r.json()
    assert admin.get(f"/adapters/{name}").status_code == 404  # nothing was published


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """A server with small limits and, on its disk, sets published before them: one asking rank_k 100,000
    (of a 9-answer list), one whose answer list is over MAX_ANSWER_LIST."""
    root = tmp_path_factory.mktemp("capped")
    refs = publish_test_sets(root)
    backbone = load_backbone("blip-tiny")
    registry, info = AdapterRegistry(root / "adapters"), BackboneInfo.of(backbone)
    refs["big-k"] = registry.publish(vqa_module(backbone, 501), "big-k", info, answer_list=ANSWERS,
                                     extra={"rank_k": 100_000}).ref
    refs["big-list"] = registry.publish(vqa_module(backbone, 502), "big-list", info,
                                        answer_list=[f"answer {i}" for i in range(21)]).ref
    srv = start_in_process(root, rank_k=2, max_rank_k=4, max_answer_list=20)
    yield srv, refs
    srv.stop()


def test_a_set_on_disk_cannot_make_a_request_exceed_max_rank_k(capped):
    srv, refs = capped
    handlers = srv.batcher.handlers
    answer, seen = handlers["answer"], []

    def recording(jobs, routing):  # the real answer stage, noting what each job asks of it
        seen.extend(j.payload.plan.k for j in jobs)
        return answer(jobs, routing)

    handlers["answer"] = recording
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for adapter, top_k in (("big-k", 1), ("big-k", 3), ("vqa-a", 1)):
                r = c.post("/vqa", json={"image": PNG, "question": "what colour?", "adapter": adapter,
                                         "top_k": top_k})
                assert r.status_code == 200, r.text
                assert r.json()["adapter"] == refs[adapter] and len(r.json()["alternatives"]) == top_k
                assert r.json()["answer"] in ANSWERS
    finally:
        handlers["answer"] = answer
    # big-k asks for 100,000 of 9 answers: 4 (MAX_RANK_K) are scored in full, whatever top_k asks below it;
    # a set that asks nothing gets RANK_K (2)
    assert seen == [4, 4, 2]


def test_a_set_on_disk_with_an_answer_list_over_the_limit_is_refused(capped):
    srv, refs = capped
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        for mode in ("rank", "generate"):
            r = c.post("/vqa", json={"image": PNG, "question": "what colour?", "adapter": "big-list", "mode": mode})
            assert r.status_code == 409, r.text
            assert r.json()["detail"] == (f"{refs['big-list']}: its answer list has 21 answers, over this server's "
                                          "limit of 20 (MAX_ANSWER_LIST)")
        for action in ("load", "pin"):
            r = c.post(f"/adapters/big-list/{action}")
            assert r.status_code == 409 and "MAX_ANSWER_LIST" in r.json()["detail"], r.text
        assert c.get("/adapters/big-list").json()["resident"] is False
        assert c.post("/vqa", json={"image": PNG, "question": "what colour?", "adapter": "vqa-a"}).status_code == 200
    assert srv.batcher.queued() == 0


def test_the_servers_own_rank_k_cannot_exceed_max_rank_k():
    with pytest.raises(ValidationError, match=r"RANK_K \(2048\) is over MAX_RANK_K \(1024\)"):
        Settings(rank_k=2048, _env_prefix="UNIADAPTER_TEST_IGNORED_")  # type: ignore[call-arg]
    raised = Settings(rank_k=2048, max_rank_k=2048, _env_prefix="UNIADAPTER_TEST_IGNORED_")  # type: ignore[call-arg]
    assert raised.rank_k == 2048
