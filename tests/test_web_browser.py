"""The web interface in a real browser (headless Chromium driven by Playwright) against a real
deployment: `captioner serve` (gunicorn, two processes: a session signed by one is read by the
other) and a `captioner worker` on Redis and PostgreSQL with the shipped model. A person signs
in, uploads a Flickr8k photo, sees it captioned, finds it by a word of its caption, approves its
alt text, and the API serves what they approved. axe-core checks every page visited; the pages
are kept as screenshots (CAPTIONER_TEST_ARTIFACTS, default test-artifacts/).

Without Chromium (Debian's `chromium` package; CAPTIONER_TEST_CHROMIUM names another binary) the
module is skipped, unless CAPTIONER_TEST_REQUIRE_BROWSER=1 (as .ci/run sets): then it fails."""
import json
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, make_key
from captioner.core import queries, storage
from captioner.core.db import make_engine, make_sessionmaker
from test_flower import _port, _start, _stop

CHROMIUM = Path(os.environ.get("CAPTIONER_TEST_CHROMIUM", "/usr/bin/chromium"))
# headless on a closed network: without the networking switches Chromium stalls on its own requests
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("CAPTIONER_TEST_ARTIFACTS") or REPO / "test-artifacts")
CAPTION_DEADLINE_S = 600  # the worker's first batch loads the model: minutes on a loaded 2-core machine
# words PostgreSQL's English configuration drops as stop words: searching for one alone finds nothing
STOP_WORDS = {"through", "there", "their", "other", "about", "above", "below", "under", "over", "into", "from",
              "with", "while", "after", "before", "against", "between", "very", "some", "each", "both"}

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # Chromium, gunicorn, a worker


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        why = f"no Chromium at {CHROMIUM}: `apt-get install chromium`, or set CAPTIONER_TEST_CHROMIUM"
        if os.environ.get("CAPTIONER_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:  # Playwright's own driver; never its browser download
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def deployment(browser, own_pg_url, redis_url, checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("web-browser")
    env = {**os.environ, "CAPTIONER_DATABASE_URL": own_pg_url, "CAPTIONER_BROKER_URL": redis_url,
           "CAPTIONER_STORAGE": str(root / "store"), "CAPTIONER_MODEL_PATH": str(checkpoint),
           "CAPTIONER_BATCH_SIZE": "4", "CAPTIONER_BATCH_WAIT_MS": "200"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = _port()
    worker = _start(["worker", "--no-beat"], env, root / "worker.log")
    api = _start(["serve", "--port", str(port), "--workers", "2", "--threads", "4"], env, root / "api.log")
    base = f"http://127.0.0.1:{port}"
    logs = lambda: (root / "api.log").read_text()[-3000:] + (root / "worker.log").read_text()[-3000:]  # noqa: E731
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):  # not listening, or still booting
                assert api.poll() is None and worker.poll() is None and time.monotonic() < deadline, logs()
                time.sleep(0.3)
        yield {"base": base, "database_url": own_pg_url, "storage": str(root / "store"), "logs": logs,
               "access_log": root / "api.log"}
    finally:
        _stop(api)
        _stop(worker)


def new_page(browser):
    """A page in a fresh context (no cookies), patient enough for a loaded 2-core machine."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.set_default_timeout(60_000)
    return page


def assert_accessible(page, name: str) -> None:
    """No serious or critical axe-core violation (WCAG 2.x A and AA rules and best practices) on
    the page as shown; the page is saved as a screenshot either way."""
    from axe_playwright_python.sync_playwright import Axe

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"web-{name}.png"), full_page=True)
    violations = Axe().run(page).response["violations"]
    bad = [(v["id"], v["impact"], [n["html"][:120] for n in v["nodes"]][:3]) for v in violations
           if v["impact"] in ("serious", "critical")]
    assert not bad, f"{name}: {bad}"


def longest_side(page, image) -> int:
    """The pixel size the browser got for an <img>, once it has loaded."""
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image.evaluate("img => Math.max(img.naturalWidth, img.naturalHeight)")


def search_word(caption: str) -> str:
    """A word of the caption to search for: the longest that a search index keeps."""
    words = [w for w in re.findall(r"[a-z]+", caption.lower()) if len(w) >= 3 and w not in STOP_WORDS]
    return max(words, key=len)


def api_get(deployment, path: str, key: str) -> dict:
    request = urllib.request.Request(deployment["base"] + path, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def test_sign_in_upload_search_and_approve(browser, deployment, photos):
    from playwright.sync_api import expect

    key = make_key(deployment["database_url"], tenant="gallery")
    base = deployment["base"]
    started = time.monotonic()
    page = new_page(browser)

    page.goto(f"{base}/")
    expect(page).to_have_url(re.compile(r"/sign-in\?next=/$"))
    assert_accessible(page, "sign-in")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Recent images")).to_be_visible()

    page.get_by_role("link", name="Upload", exact=True).click()
    assert_accessible(page, "upload")
    page.get_by_label("Photos").set_input_files(str(photos[7]))
    page.get_by_role("button", name="Upload and caption").click()
    expect(page).to_have_url(re.compile(r"/images/\d+$"))
    image_id = int(page.url.rsplit("/", 1)[1])
    uploaded = time.monotonic()
    # the page updates itself until the worker has captioned the photo
    expect(page.locator("#caption")).to_be_visible(timeout=CAPTION_DEADLINE_S * 1000)
    captioned = time.monotonic()
    caption = page.locator("#caption").inner_text()
    alt_text = page.locator("#alt-text").inner_text()
    assert caption and alt_text, deployment["logs"]()
    preview = page.get_by_role("img", name=alt_text)
    expect(preview).to_be_visible()
    assert longest_side(page, preview) <= 1024  # a preview, never the photo itself
    assert_accessible(page, "image-captioned")

    word = search_word(caption)
    page.get_by_label("Search captions").fill(word)
    page.get_by_role("button", name="Search", exact=True).click()
    expect(page.get_by_role("heading", name=re.compile("Results for"))).to_be_visible()
    thumbnail = page.locator(f'a[href="/images/{image_id}"] img')
    expect(thumbnail).to_be_visible()
    expect(thumbnail).to_have_attribute("alt", alt_text)
    assert longest_side(page, thumbnail) <= 320
    assert_accessible(page, "search")

    page.get_by_role("link", name=caption).first.click()
    expect(page).to_have_url(f"{base}/images/{image_id}")
    page.get_by_role("button", name="Approve", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="alt text approved")).to_be_visible()
    expect(page.locator(".badge-approved").first).to_be_visible()
    assert_accessible(page, "image-approved")
    page.screenshot(path=str(ARTIFACTS / "web-ui.png"))  # the one docs/web-ui.md shows
    for name, path in (("gallery", "/"), ("review", "/review"), ("batches", "/batches")):
        page.goto(base + path)
        assert_accessible(page, name)

    approved = api_get(deployment, f"/v1/images/{image_id}/alt-text", key)
    assert (approved["state"], approved["text"], approved["by"]) == ("approved", alt_text, f"key {key[:16]}")
    log = deployment["access_log"].read_text()
    assert "POST /sign-in" in log and key[17:] not in log  # gunicorn logs the request line, never the form
    print(f"\nbrowser flow {time.monotonic() - started:.1f}s, of which waiting for the caption "
          f"{captioned - uploaded:.1f}s (the worker's model load included): {caption!r}, searched for {word!r}")


def test_review_queue_by_keyboard(browser, deployment, photos):
    """Three photos whose alt text the model was unsure of, reviewed with single keys only."""
    from playwright.sync_api import expect

    url = deployment["database_url"]
    key = make_key(url, tenant="reviewer")
    engine = make_engine(url)
    with make_sessionmaker(engine).begin() as s:  # written as a worker writes them, by a model of its own
        images = [queries.NewImage(*storage.store(deployment["storage"], p.read_bytes())[:1],
                                   f"review:{p.name}") for p in photos[20:23]]
        submitted = queries.submit(s, images, "reviewmodel1", "backfill", tenant="reviewer")
        claimed = queries.claim(s, "reviewmodel1", 600, 10, job_ids=[x.job_id for x in submitted])
        queries.complete(s, [queries.Result(c, f"a dog number {n}", f"A dog number {n}.", [(f"a dog number {n}", 0.2)],
                                            [("dog", 0.5)], 0.2, True, 500, 375) for n, c in enumerate(claimed)],
                         [], "reviewmodel1", forward_size=3)
    engine.dispose()
    first, second, third = sorted(x.image_id for x in submitted)

    page = new_page(browser)
    page.goto(f"{deployment['base']}/review")
    page.get_by_label("API key").fill(key)
    page.keyboard.press("Enter")
    heading = page.get_by_role("heading", name=re.compile(r"^Image \d+"))

    def showing(image_id: int) -> None:
        expect(heading).to_have_text(re.compile(f"^Image {image_id} "))
        page.wait_for_load_state()  # the shortcuts' script runs once the page has loaded

    showing(first)
    assert_accessible(page, "review-queue")

    page.get_by_label(re.compile("Single-key shortcuts")).uncheck()  # WCAG 2.1.4: they can be turned off
    page.keyboard.press("a")
    page.wait_for_timeout(500)
    showing(first)
    page.get_by_label(re.compile("Single-key shortcuts")).check()

    page.keyboard.press("s")  # skip the first
    showing(second)
    page.keyboard.press("e")  # edit the second: the field takes focus, Ctrl+Enter saves
    expect(page.get_by_label("Edit the alt text")).to_be_focused()
    page.keyboard.type("A black dog in tall grass.")
    page.keyboard.press("Control+Enter")
    showing(first)  # back to the one skipped
    page.keyboard.press("a")
    showing(third)
    page.keyboard.press("d")
    expect(page.get_by_text("Nothing to review")).to_be_visible()

    decided = [api_get(deployment, f"/v1/images/{i}/alt-text", key) for i in (first, second, third)]
    assert [(d["state"], d["text"]) for d in decided] == [
        ("approved", "A dog number 0."), ("edited", "A black dog in tall grass."), ("decorative", "")]
