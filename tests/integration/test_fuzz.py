"""Our own fuzzer beside schemathesis: random bytes, random JSON (and valid bodies with one field broken)
and random multipart forms at every route of the OpenAPI schema, with the admin key so every handler is
reached. No 5xx, every 4xx in the one error shape, and the server healthy afterwards."""

from __future__ import annotations

import base64
import json
import random
import string
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from support.media import image_bytes, video_bytes
from support.server import publish_test_sets, start_server

SEED = 20261130
REQUESTS_PER_ROUTE = 40
NAMES = ["ret-a", "vqa-a", "video-a", "none", "fuzz", "nope", "ret-a@0000", "../x", "naïve", "a" * 300, "%00", ""]
PNG = image_bytes()
CLIP = video_bytes([(255, 0, 0)] * 4)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-data")
    publish_test_sets(root)
    (root / "media").mkdir()
    (root / "media" / "x.png").write_bytes(PNG)
    srv = start_server(root, tmp_path_factory.mktemp("fuzz-logs"), max_wait_ms=5, max_image_bytes=200_000,
                       max_request_bytes=1_000_000, max_video_bytes=300_000, max_queue=64)
    assert httpx.post(f"{srv.url}/collections", json={"name": "fuzz", "kind": "image", "adapter": "ret-a"}
                      ).status_code == 201
    yield srv
    srv.stop()


HOSTILE = ["a\x00b", "\x00", "x" * 5000, "y" * 300, "../../etc/passwd", "/etc/passwd", "inside/../../x",
           "\u202e", "%s%n", "' OR 1=1 --", "nul\x00.png", "x.png/", "."]


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(HOSTILE)
    alphabet = string.printable + "\x00\u00e9\u4e2d\ufffd\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 40, 600])))


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 3, 2**31, -(2**63), 10**30])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, 3.0])
    if kind == 4:
        return random_text(rng)
    if kind == 5:
        return rng.choice([base64.b64encode(PNG).decode(), base64.b64encode(CLIP).decode(), "", "====", "data:,"])
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_text(rng)[:12] or "k": random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def valid_bodies() -> dict[str, dict[str, Any]]:
    png = base64.b64encode(PNG).decode()
    return {
        "/vqa": {"image": png, "question": "what colour?", "adapter": "vqa-a"},
        "/videoqa": {"video": base64.b64encode(CLIP).decode(), "question": "what colour?", "adapter": "video-a"},
        "/retrieve": {"query_text": "red", "candidate_images": [png], "adapter": "ret-a"},
        "/collections": {"name": "made-by-fuzz", "kind": "image", "adapter": "ret-a"},
        "/collections/{name}/items": {"items": [{"image": png}, {"path": "x.png"}]},
        "/collections/{name}/reindex": {"adapter": "ret-b"},
    }


def json_body(rng: random.Random, template: dict[str, Any] | None) -> Any:
    """A random JSON value, or a valid body with one value (at any depth) replaced or one key added."""
    if template is None or rng.random() < 0.3:
        return random_value(rng)
    body = json.loads(json.dumps(template))
    node: Any = body
    while True:
        keys = list(range(len(node))) if isinstance(node, list) else [*node, "unknown_field"]
        key = rng.choice(keys)
        child = node[key] if key != "unknown_field" else None
        if isinstance(child, dict | list) and child and rng.random() < 0.7:
            node = child
            continue
        node[key] = random_value(rng) if rng.random() < 0.6 else random_text(rng)
        return body


def multipart(rng: random.Random) -> dict[str, Any]:
    fields = ["image", "video", "question", "adapter", "top_k", "files", "ids", "metadata", "config", "weights",
              "query_text", "query_image", "candidate_images", "candidate_texts", "mode", "num_frames"]
    files, data = [], {}
    for name in rng.sample(fields, rng.randrange(1, 6)):
        if rng.random() < 0.5:
            content = rng.choice([PNG, CLIP, b"", rng.randbytes(rng.randrange(1, 3000)), PNG[: len(PNG) // 2]])
            files.append((name, (random_text(rng)[:20] or "f", content, rng.choice(
                ["image/png", "video/mp4", "application/octet-stream", "text/plain", "image/jpeg"]))))
        else:
            data[name] = random_text(rng)
    return {"files": files or None, "data": data}


def fuzz_request(rng: random.Random, path: str, method: str) -> dict[str, Any]:
    kind = rng.randrange(4)
    if kind == 0:  # random bytes under a random content type
        ctype = rng.choice(["application/json", "multipart/form-data; boundary=zz", "multipart/form-data",
                            "text/plain", "application/x-www-form-urlencoded", ""])
        return {"content": rng.randbytes(rng.randrange(0, 4000)), "headers": {"content-type": ctype}}
    if kind in (1, 2):
        return {"json": json_body(rng, valid_bodies().get(path))}
    return multipart(rng)


REAL = {"{name}": ["fuzz"], "{ref}": ["ret-a", "vqa-a", "video-a"], "{item_id}": ["x"]}


def fill(path: str, rng: random.Random) -> str:
    """Path parameters: half the time a name that exists, so handlers past the lookup are reached."""
    for param, real in REAL.items():
        if param in path:
            name = rng.choice(real) if rng.random() < 0.5 else rng.choice(NAMES)
            if param == "{name}" and path.startswith("/adapters"):
                name = rng.choice(REAL["{ref}"])
            path = path.replace(param, quote(name, safe="") or "x")
    return path


def leaves(node: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Paths to every string in a JSON body."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in leaves(v, (*at, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in leaves(v, (*at, i))]
    return [at] if isinstance(node, str) else []


def check(r: httpx.Response, what: str, failures: list[str]) -> None:
    if r.status_code >= 500:
        failures.append(f"{what}: {r.status_code} {r.text[:200]}")
    elif r.status_code >= 400:
        body = r.json()
        if set(body) != {"error", "detail"} or not all(isinstance(v, str) for v in body.values()):
            failures.append(f"{what}: {r.status_code} not in the error shape: {r.text[:200]}")


def test_every_hostile_string_in_every_field_of_valid_bodies(fuzz_server):
    failures: list[str] = []
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
        for path, template in valid_bodies().items():
            url = path.replace("{name}", "fuzz")
            for at in leaves(template):
                for hostile in HOSTILE:
                    body = json.loads(json.dumps(template))
                    node = body
                    for key in at[:-1]:
                        node = node[key]
                    node[at[-1]] = hostile
                    check(c.post(url, json=body), f"POST {url} {at}={hostile[:20]!r}", failures)
    assert not failures, "\n".join(failures[:20])


def test_random_requests_at_every_route_never_5xx(fuzz_server):
    rng = random.Random(SEED)
    spec = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    routes = [(p, m.upper()) for p, ops in spec["paths"].items() for m in ops if m in ("get", "post", "delete")]
    assert len(routes) >= 15
    failures = []
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
        for path, method in routes:
            for _ in range(REQUESTS_PER_ROUTE):
                use = method if rng.random() < 0.9 else rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
                kwargs = fuzz_request(rng, path, use) if use in ("POST", "PUT", "PATCH") else {}
                url = fill(path, rng)
                query = {"verbose": rng.choice(["true", "2", "x" * 50])} if rng.random() < 0.1 else None
                r = c.request(use, url, params=query, **kwargs)
                check(r, f"{use} {url}", failures)
    assert not failures, "\n".join(failures[:20])
    assert httpx.get(f"{fuzz_server.url}/healthz").status_code == 200
    assert httpx.get(f"{fuzz_server.url}/readyz").json()["status"] == "ready"
    ok = httpx.post(f"{fuzz_server.url}/vqa", json=valid_bodies()["/vqa"], timeout=60)
    assert ok.status_code == 200, ok.text
    log = fuzz_server.log.read_text()
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]
