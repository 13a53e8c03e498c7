"""uniadapter_serve.client against the real session server (no mocks): sync and async calls, typed results, and
errors raised with the server's status and detail."""

from __future__ import annotations

import asyncio

import pytest
from support.keys import ADMIN_KEY, READ_KEY
from support.media import image_bytes, video_bytes

from uniadapter_serve.client import Answer, ApiError, AsyncClient, Client, Hit, Moments, Retrieval
from uniadapter_serve.model.media.video import plan_moments

RED, BLUE = image_bytes((220, 20, 20)), image_bytes((20, 20, 220))
LONG = video_bytes([((7 * i) % 256, (200 - 3 * i) % 256, (90 + 11 * i) % 256) for i in range(80)], fps=2, gop=4)
"""40 s at 2 fps, each frame its own colour"""


def flat(spans) -> list[float]:
    return [x for span in spans for x in span]


def test_sync_client_tasks_collections_adapters(server, refs, tmp_path):
    path = tmp_path / "red.png"
    path.write_bytes(RED)
    with Client(server.url, api_key=ADMIN_KEY) as c:
        answer = c.vqa(path, "what colour?", adapter="vqa-a", top_k=2)
        assert isinstance(answer, Answer) and answer.adapter == refs["vqa-a"] and len(answer.alternatives) == 2
        clip = c.videoqa(video_bytes([(200, 0, 0)] * 4), "what happens?", adapter="video-a")
        assert clip.adapter == refs["video-a"]

        info = c.create_collection("client-sync", "image", adapter="ret-a")
        assert (info.name, info.items, info.adapter) == ("client-sync", 0, refs["ret-a"])
        assert c.add_items("client-sync", [path, BLUE], ids=["red", "blue"]) == ["red", "blue"]
        assert [it.id for it in c.all_items("client-sync", page_size=1)] == ["red", "blue"]
        assert c.item("client-sync", "red").metadata == {"filename": "red.png"}
        assert c.media("client-sync", "blue") == BLUE
        assert c.thumbnail("client-sync", "blue", size=64)[:2] == b"\xff\xd8"

        found = c.retrieve(query_image=RED, collection="client-sync", top_k=2)
        assert isinstance(found, Retrieval) and isinstance(found.results[0], Hit)
        assert found.results[0].id == "red" and found.results[0].media_url.endswith("/items/red/media")
        only_blue = c.retrieve(query_text="a red square", collection="client-sync", top_k=2,
                               filter={"metadata": {"filename": "item-1"}})
        assert [h.id for h in only_blue.results] == ["blue"]
        assert any(col.name == "client-sync" for col in c.collections())

        names = {a.name for a in c.adapters()}
        assert {"ret-a", "vqa-a", "video-a"} <= names
        assert c.adapter_action("vqa-b", "pin").pinned
        assert not c.adapter_action("vqa-b", "unpin").pinned

        c.delete_item("client-sync", "red")
        assert c.collection("client-sync").items == 1
        c.delete_collection("client-sync")
        with pytest.raises(ApiError) as err:
            c.collection("client-sync")
        assert err.value.status == 404 and "no collection named 'client-sync'" in err.value.detail


def test_errors_carry_status_and_detail(server):
    with Client(server.url, api_key=READ_KEY) as c:
        with pytest.raises(ApiError) as err:
            c.create_collection("not-allowed")
        assert err.value.status == 403 and err.value.error == "AuthError"
        with pytest.raises(ApiError) as err:
            c.vqa(b"not an image", "what colour?", adapter="vqa-a")
        assert err.value.status == 415 and "image" in err.value.detail
    with Client(server.url) as anonymous, pytest.raises(ApiError) as err:
        anonymous.adapters()
    assert err.value.status == 401


def test_async_client_runs_concurrent_calls(server, refs):
    async def main() -> tuple[list[Answer], Retrieval, int]:
        async with AsyncClient(server.url, api_key=READ_KEY) as c:
            answers = await asyncio.gather(*(c.vqa(img, "what colour?", adapter="vqa-a") for img in (RED, BLUE)))
            ranked = await c.retrieve(query_text="a red square", candidate_images=[BLUE, RED], top_k=2,
                                      adapter="ret-a")
            try:
                await c.items("no-such-collection")
            except ApiError as e:
                return list(answers), ranked, e.status
            return list(answers), ranked, 200

    answers, ranked, status = asyncio.run(main())
    with Client(server.url, api_key=READ_KEY) as c:
        alone = c.vqa(RED, "what colour?", adapter="vqa-a")  # the same answer, sync or async
    assert answers[0].answer == alone.answer and answers[0].score == pytest.approx(alone.score, abs=1e-4)
    assert {h.id for h in ranked.results} == {"0", "1"} and ranked.adapter == refs["ret-a"]
    assert status == 404


def test_moments_through_the_client(server, refs):
    with Client(server.url, api_key=ADMIN_KEY) as c:
        info = c.create_collection("client-moments", "video", adapter="ret-video",
                                   moments={"window_s": 8, "stride_s": 4})
        assert info.moments == Moments(8.0, 4.0, 0) and info.adapter == refs["ret-video"]
        plain = c.create_collection("client-plain-videos", "video", adapter="ret-video")
        assert plain.moments is None
        defaults = c.create_collection("client-default-moments", "video", adapter="ret-video", moments=True)
        assert defaults.moments is not None and defaults.moments.stride_s <= defaults.moments.window_s
        try:
            assert c.add_items("client-moments", [LONG], ids=["long"]) == ["long"]
            item = c.item("client-moments", "long")
            assert flat(item.moments) == pytest.approx(flat(plan_moments(40.0, 8.0, 4.0)), abs=1e-3)
            assert len(item.moments) == 9
            assert c.collection("client-moments").moments == Moments(8.0, 4.0, 9)

            every = c.retrieve(query_text="a colour", collection="client-moments", top_k=20, group_by_item=False)
            assert sorted(h.moment for h in every.results) == list(range(9))
            for h in every.results:
                assert (h.start_s, h.end_s) == pytest.approx(item.moments[h.moment], abs=1e-3)
                assert h.media_url.endswith(f"/media#t={h.start_s:.3f},{h.end_s:.3f}")
            best = c.retrieve(query_text="a colour", collection="client-moments", top_k=5).results
            assert [(h.id, h.moment) for h in best] == [("long", every.results[0].moment)]
            top = every.results[0]
            assert c.thumbnail("client-moments", "long", size=64, t=(top.start_s + top.end_s) / 2)[:2] == b"\xff\xd8"

            lo, hi = item.moments[3]
            on_moment = c.videoqa(question="what colour?", collection="client-moments", item="long", moment=3,
                                  adapter="video-a")
            on_span = c.videoqa(question="what colour?", collection="client-moments", item="long", start_s=lo,
                                end_s=hi, adapter="video-a")
            assert on_moment == on_span and on_moment.adapter == refs["video-a"]
            part = c.videoqa(video_bytes([(200, 0, 0)] * 40 + [(0, 0, 200)] * 40), "what colour?",
                             start_s=2.0, adapter="video-a")
            assert part.adapter == refs["video-a"]
            with pytest.raises(ApiError) as err:
                c.videoqa(question="what colour?", collection="client-moments", item="long", moment=9,
                          adapter="video-a")
            assert err.value.status == 422 and err.value.detail.startswith("moment: item 'long' has 9 moments")
        finally:
            for name in ("client-moments", "client-plain-videos", "client-default-moments"):
                c.delete_collection(name)


def test_async_client_moments(server):
    async def main() -> tuple[list[Hit], list[Hit], Answer]:
        async with AsyncClient(server.url, api_key=ADMIN_KEY) as c:
            info = await c.create_collection("client-async-moments", "video", adapter="ret-video",
                                             moments={"window_s": 10, "stride_s": 10})
            assert info.moments == Moments(10.0, 10.0, 0)
            try:
                await c.add_items("client-async-moments", [LONG], ids=["long"])
                every = await c.retrieve(query_text="a colour", collection="client-async-moments", top_k=10,
                                         group_by_item=False)
                grouped = await c.retrieve(query_text="a colour", collection="client-async-moments", top_k=10,
                                           group_by_item=True)
                answer = await c.videoqa(question="what colour?", collection="client-async-moments", item="long",
                                         moment=1, adapter="video-a")
                return every.results, grouped.results, answer
            finally:
                await c.delete_collection("client-async-moments")

    every, grouped, answer = asyncio.run(main())
    assert flat((h.start_s, h.end_s) for h in sorted(every, key=lambda h: h.moment)) == pytest.approx(
        [0, 10, 10, 20, 20, 30, 30, 40], abs=1e-3)
    assert len(grouped) == 1 and grouped[0].moment == every[0].moment
    assert answer.answer
