"""uniadapter_serve.client against the real session server (no mocks): sync and async calls, typed results, and
errors raised with the server's status and detail."""

from __future__ import annotations

import asyncio

import pytest
from support.keys import ADMIN_KEY, READ_KEY
from support.media import image_bytes, video_bytes

from uniadapter_serve.client import Answer, ApiError, AsyncClient, Client, Hit, Retrieval

RED, BLUE = image_bytes((220, 20, 20)), image_bytes((20, 20, 220))


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
