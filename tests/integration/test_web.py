"""The built-in page at `/` in a real browser (Debian's headless Chromium through Playwright) against the real
demo server: search by a held-out caption, open a hit, ask a colour question about an uploaded scene, the
adapters panel, a collection created, filled by drag and drop and deleted, and the server's error detail shown.
Every step leaves a screenshot under the test's tmp dir, checked not blank."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import sync_playwright
from support.browser import assert_not_blank, chromium_path, small_png
from support.keys import ADMIN_KEY, READ_KEY
from support.server import start_server

from uniadapter_serve.service import demo

DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "web-search.png"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    assert demo.shipped(), "the trained demo backbone and sets must ship in model/demo/"
    srv = start_server(tmp_path_factory.mktemp("web-data"), tmp_path_factory.mktemp("web-logs"), backbone="demo",
                       api_key=READ_KEY, admin_key=ADMIN_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def csp_violations(pg) -> list[str]:
    """Console errors of this page that name the Content-Security-Policy (Chromium logs each blocked load or
    script): the list fills as the page runs; a test asserts it is empty at the end."""
    seen: list[str] = []
    pg.on("console", lambda m: seen.append(m.text) if "Content Security Policy" in m.text else None)
    return seen


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    blocked = csp_violations(pg)
    pg.goto(server.url + "/")
    pg.fill("#key", ADMIN_KEY)
    pg.dispatch_event("#key", "change")
    pg.wait_for_selector(f"#search-collection option[value='{demo.IMAGES}']", state="attached")
    yield pg
    context.close()
    assert blocked == []  # the page's CSP (service/security.py) blocks nothing the page does


def shot(pg, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    pg.screenshot(path=str(path))
    assert_not_blank(path)
    return path


def test_search_open_ask_and_adapters(page, tmp_path):
    scene = demo.image_items(1)[0]  # held out: never seen in training; ranked first by the demo set (most captions
    # of a lone shape are, but which side it is on is the demo set's weak spot: see README)
    caption = scene.metadata["caption"]
    page.select_option("#search-collection", demo.IMAGES)
    page.fill("#search-text", caption)
    page.click("#search-form button[type=submit]")
    page.wait_for_function("() => { const i = document.querySelector('#results .hit img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    first = page.locator("#results .hit").first
    assert first.get_attribute("title") == caption
    assert first.get_attribute("data-id") in {it.id for it in demo.image_items(demo.NUM_IMAGES)
                                              if it.metadata["caption"] == caption}  # itself or a twin
    searched = shot(page, tmp_path, "1-search")
    if os.environ.get("UNIADAPTER_UPDATE_SCREENSHOTS"):
        assert small_png(searched, DOCS_SCREENSHOT) < 100_000

    first.click()
    page.wait_for_function("() => { const i = document.querySelector('#viewer-full');"
                           " return i && i.complete && i.naturalWidth === 96; }")  # the stored 96 px scene, in full
    assert caption in page.inner_text("#viewer-meta")
    shot(page, tmp_path, "2-open")
    page.click("#viewer .close")

    example = demo.example_scene()
    page.click(".tab[data-tab=ask]")
    page.set_input_files("#ask-file", files=[{"name": "scene.png", "mimeType": "image/png",
                                              "buffer": base64.b64decode(demo.example_image())}])
    page.fill("#ask-question", f"what colour is the {example.shapes[0].shape}?")
    page.click("#ask-form button[type=submit]")
    page.wait_for_selector("#answer-text")
    assert page.inner_text("#answer-text") == example.shapes[0].color
    shot(page, tmp_path, "3-ask")

    page.click(".tab[data-tab=adapters]")
    page.wait_for_selector("#adapter-table tbody tr")
    listed = page.locator("#adapter-table tbody tr td:first-child").all_inner_texts()
    for name in demo.DEMO_SETS.values():
        assert any(ref.startswith(name + "@") for ref in listed), (name, listed)
    shot(page, tmp_path, "4-adapters")


def test_collection_create_drop_upload_delete(page, tmp_path):
    page.on("dialog", lambda d: d.accept())
    page.click(".tab[data-tab=collections]")
    page.fill("#create-name", "web-drop")
    page.click("#create-form button[type=submit]")
    zone = "#collection-table .drop[data-collection='web-drop']"
    page.wait_for_selector(zone)
    scene = demo.image_items(1)[0]
    transfer = page.evaluate_handle(
        """([b64, name]) => { const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const t = new DataTransfer(); t.items.add(new File([bytes], name, {type: 'image/png'})); return t; }""",
        [base64.b64encode(scene.data).decode(), "dropped.png"])
    page.dispatch_event(zone, "drop", {"dataTransfer": transfer})
    page.wait_for_function("() => document.querySelector(\"tr[data-collection='web-drop'] .count\")"
                           "?.textContent === '1'")
    assert page.eval_on_selector("#upload-progress", "p => p.value") == 1
    assert "added 1 item(s) to web-drop" in page.inner_text("#upload-status")
    shot(page, tmp_path, "5-upload")

    page.click("tr[data-collection='web-drop'] button")
    page.wait_for_selector("tr[data-collection='web-drop']", state="detached")
    shot(page, tmp_path, "6-deleted")


def test_errors_show_the_servers_detail(page, tmp_path):
    page.fill("#search-text", "?!")  # no word in it: the server says so
    page.click("#search-form button[type=submit]")
    page.wait_for_selector("#error:not([hidden])")
    assert "422: query_text: must contain at least one word" in page.inner_text("#error")
    page.fill("#key", "wrong-key")
    page.dispatch_event("#key", "change")
    page.wait_for_function("() => document.querySelector('#error').textContent.includes('403: wrong API key')")
    shot(page, tmp_path, "7-error")


def test_docs_run_under_their_csp(browser, server, tmp_path):
    """Swagger UI (its inline start-up script allowed by hash) and ReDoc (inline styles, a blob worker) render
    from local files with nothing blocked."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    blocked = csp_violations(pg)
    pg.goto(server.url + "/docs")
    pg.wait_for_selector(".opblock-summary-path[data-path='/vqa']")
    shot(pg, tmp_path, "8-docs")
    pg.goto(server.url + "/redoc")
    pg.wait_for_selector("h1:has-text('UniAdapter Serve')")
    pg.wait_for_function("() => document.body.innerText.includes('/vqa')")
    shot(pg, tmp_path, "9-redoc")
    context.close()
    # ReDoc's bundle shows a "powered by" logo from its CDN: a third-party load the policy is there to stop
    assert [m for m in blocked if "https://cdn.redoc.ly/" not in m] == []


def test_stored_media_opened_on_its_own_still_shows(browser, server):
    """A media URL opened directly (its sandboxing CSP and inline Content-Disposition): the browser's own image
    and video viewers work."""
    key = {"Authorization": f"Bearer {ADMIN_KEY}"}
    context = browser.new_context(extra_http_headers=key)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    blocked = csp_violations(pg)
    shown = {demo.IMAGES: "() => document.images[0]?.complete && document.images[0].naturalWidth > 0",
             demo.VIDEOS: "() => (document.querySelector('video')?.readyState ?? 0) >= 1"}  # metadata decoded
    for collection, check in shown.items():
        first = httpx.get(f"{server.url}/collections/{collection}/items", params={"limit": 1}, headers=key).json()
        response = pg.goto(server.url + first["items"][0]["media_url"])
        assert response is not None and response.headers["content-disposition"].startswith("inline; filename=")
        pg.wait_for_function(check)
    context.close()
    assert blocked == []
