"""The web page at /ui, driven in headless Chromium (Debian's chromium + chromium-driver) against `bentoml serve`."""

from __future__ import annotations

import os
import shutil
import tempfile

import httpx
import pytest

from .images import BEE

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("CI must test the web page: install Debian's chromium and chromium-driver (.ci/run does)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="headstart-chromium-")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_is_served(server):
    url, _, _ = server
    resp = httpx.get(f"{url}/ui", timeout=10)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert '<input id="file" type="file"' in resp.text
    assert httpx.get(f"{url}/ui/", timeout=10, follow_redirects=False).headers["location"] == "/ui"
    assert httpx.post(f"{url}/ui", timeout=10).status_code == 405


def test_picking_an_image_shows_top_classes_and_boxes(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    browser.get(f"{url}/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "ants-bees" in d.find_element(By.ID, "model").text)  # /info answered
    browser.find_element(By.ID, "file").send_keys(str(BEE))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#predictions li.prediction")))
    labels = [li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "li.prediction")]
    assert labels[0] == "bees" and set(labels) == {"ants", "bees"}
    boxes = browser.find_elements(By.CSS_SELECTOR, "#stage .box")
    assert boxes and boxes[0].get_attribute("data-label") == "bees"
    img = browser.find_element(By.CSS_SELECTOR, "#stage img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
    box, pic = boxes[0].rect, img.rect  # the box is drawn over the picture
    assert pic["x"] - 1 <= box["x"] and box["x"] + box["width"] <= pic["x"] + pic["width"] + 1
    assert pic["y"] - 1 <= box["y"] and box["y"] + box["height"] <= pic["y"] + pic["height"] + 1
    assert "method: cam" in browser.find_element(By.ID, "status").text
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_an_image_pasted_into_the_page_is_analysed(server, browser):
    """Ctrl+V of a screenshot or of an image copied from another page: the clipboard's file, as a picked one (text
    pasted does nothing)."""
    import base64

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    browser.get(f"{url}/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "ants-bees" in d.find_element(By.ID, "model").text)
    paste = """
        const [data, type] = arguments;
        const clip = new DataTransfer();
        if (type) clip.items.add(new File([Uint8Array.from(atob(data), (c) => c.charCodeAt(0))], "", {type}));
        else clip.setData("text/plain", data);
        document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: clip, bubbles: true}));
    """
    browser.execute_script(paste, "hello", None)
    assert browser.find_element(By.ID, "status").text == "" and not browser.find_elements(By.CSS_SELECTOR, "li")
    browser.execute_script(paste, base64.b64encode(BEE.read_bytes()).decode(), "image/jpeg")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#predictions li.prediction")))
    labels = [li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "li.prediction")]
    assert labels[0] == "bees"
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_a_file_that_is_not_an_image_shows_the_services_message(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").text)
    assert "could not analyse" in browser.find_element(By.ID, "error").text


def test_a_photo_with_a_long_non_ascii_name_and_no_extension_is_analysed(server, browser, tmp_path):
    """The browser sends such a file as application/octet-stream (no extension to guess from) with its 250-byte
    name; the service knows the image by its bytes and never uses the name."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _, _ = server
    photo = tmp_path / ("蜂の写真" * 20 + "x" * 10)  # 250 bytes of UTF-8, the most most file systems allow
    photo.write_bytes(BEE.read_bytes())
    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, "#predictions li.prediction")))
    labels = [li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "li.prediction")]
    assert labels[0] == "bees"
    assert not browser.find_element(By.ID, "error").text


def test_a_photo_of_something_else_shows_none_of_these_without_boxes(server, browser):
    """A cat is not an ant or a bee: the page says "none of these" with the novelty, draws no box, and shows the
    closest classes only greyed out, for reference."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .conftest import PHOTOS

    url, _, _ = server
    browser.get_log("browser")  # what earlier tests left (a refused text file is a 400 by design)
    browser.get(f"{url}/ui")
    WebDriverWait(browser, 30).until(lambda d: "none of these above novelty" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(PHOTOS / "cat_720p.jpg"))
    verdict = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "verdict").text and d.find_element(By.ID, "verdict")
    )
    assert verdict.text.startswith("None of these") and "novelty" in verdict.text
    assert verdict.get_attribute("class") == "unknown"
    assert browser.find_element(By.ID, "predictions").get_attribute("class") == "unknown"
    assert not browser.find_elements(By.CSS_SELECTOR, "#stage .box")
    browser.find_element(By.ID, "heat").click()  # the heatmap, on request: the service's picture replaces the photo
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script(
            "const i = document.querySelector('#stage img'); return i && i.complete && i.naturalWidth === 1024"
        )
    )
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


@pytest.fixture(scope="module")
def multilabel_server(tmp_path_factory):
    """A multi-label model of the synthetic scenes (red square, blue disc, green bar), exported and served."""
    from .conftest import serving
    from .test_multilabel import make_csv_set, train_scenes

    root = tmp_path_factory.mktemp("multilabel")
    path, truth = make_csv_set(root / "data", 64, split=True)
    run = train_scenes(path, root / "run", root / "cache")
    bundle = run.export(store=False)
    with serving(str(bundle.dir), root / "server.log") as (url, _, _):
        yield url, root / "data", truth


def test_a_multi_label_model_shows_the_labels_an_image_holds_or_none_of_these(multilabel_server, browser):
    """The page of a multi-label model: the verdict names every label the service says the image holds (as
    /localize answers them), and a photo unlike every scene is "none of these" with no label and no box."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .conftest import PHOTOS

    url, data, truth = multilabel_server
    browser.get_log("browser")
    browser.get(f"{url}/ui")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: "multilabel" in d.find_element(By.ID, "model").text)
    name = next(n for n, labels in truth.items() if len(labels) >= 2)  # a scene with two shapes or more
    image = data / name
    served = httpx.post(f"{url}/localize", files={"image": ("s.jpg", image.read_bytes(), "image/jpeg")}, timeout=60)
    expected = [p["label"] for p in served.json()["labels"]]
    assert expected and not served.json()["unknown"]  # a training image the model learned: it holds labels
    browser.find_element(By.ID, "file").send_keys(str(image))
    verdict = wait.until(lambda d: d.find_element(By.ID, "verdict").text)
    assert verdict.startswith("Labels: ") and [p.split()[0] for p in verdict[8:].split(", ")] == expected
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "li.prediction"))
    shown = {li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "li.prediction")}
    assert set(expected) <= shown <= {"red", "blue", "green"}

    browser.find_element(By.ID, "file").send_keys(str(PHOTOS / "cat_720p.jpg"))
    wait.until(lambda d: d.find_element(By.ID, "verdict").text.startswith("None of these"))
    assert browser.find_element(By.ID, "verdict").get_attribute("class") == "unknown"
    assert not browser.find_elements(By.CSS_SELECTOR, "#stage .box")
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_a_service_with_api_keys_asks_the_page_for_one(hymenoptera_bundle, browser, tmp_path):
    """HEADSTART_API_KEYS: the page loads, says the service needs a key and asks for it; a wrong key is said so;
    with the right one the model's line and the answers come as without keys. The docs page's "Try it out" was a 401
    with no way to give a key: its Authorize button now takes one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from .conftest import serving

    key = "0123456789abcdef-page-key"
    with serving(hymenoptera_bundle.tag, tmp_path / "server.log", HEADSTART_API_KEYS=key) as (url, _, _):
        browser.get(f"{url}/ui")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "auth").is_displayed())
        assert "needs an API key" in browser.find_element(By.ID, "model").text
        browser.find_element(By.ID, "file").send_keys(str(BEE))
        wait.until(lambda d: "needs an API key" in d.find_element(By.ID, "error").text)
        browser.find_element(By.ID, "key").send_keys("not-the-key-at-all-0000")
        browser.find_element(By.ID, "use-key").click()
        wait.until(lambda d: "not one this service accepts" in d.find_element(By.ID, "model").text)
        field = browser.find_element(By.ID, "key")
        field.clear()
        field.send_keys(key)
        browser.find_element(By.ID, "use-key").click()  # the picture picked before is analysed with the key
        wait.until(lambda d: "ants-bees" in d.find_element(By.ID, "model").text)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#predictions li.prediction")))
        assert not browser.find_element(By.ID, "auth").is_displayed()
        labels = [li.get_attribute("data-label") for li in browser.find_elements(By.CSS_SELECTOR, "li.prediction")]
        assert labels[0] == "bees"
        # the docs page (BentoML's Swagger UI at /): its Authorize button takes the key, and "Try it out" sends it
        browser.get(f"{url}/")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.authorize"))
        assert _try_info(browser, wait) == "401"
        browser.find_element(By.CSS_SELECTOR, "button.authorize").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".modal-ux input"))
        browser.find_element(By.CSS_SELECTOR, ".modal-ux input").send_keys(key)
        browser.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper button.authorize").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".modal-ux button.btn-done"))
        browser.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()
        assert _try_info(browser, wait) == "200"
        browser.get(f"{url}/ui")
        browser.execute_script("sessionStorage.clear()")  # the next tests' pages start without it
        browser.get_log("browser")  # and their logs without the 401s asked for here


def _try_info(browser, wait) -> str:
    """The docs page's "Try it out" of POST /info, executed: the status it shows."""
    from selenium.webdriver.common.by import By

    def block():
        return next(
            b
            for b in browser.find_elements(By.CSS_SELECTOR, ".opblock")
            if b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").text == "/info"
        )

    if not block().find_elements(By.CSS_SELECTOR, ".try-out__btn"):
        block().find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda d: block().find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    button = block().find_element(By.CSS_SELECTOR, ".try-out__btn")
    if button.text.strip() == "Try it out":
        button.click()
        wait.until(lambda d: block().find_elements(By.CSS_SELECTOR, ".execute"))
    for old in block().find_elements(By.CSS_SELECTOR, ".btn-clear"):
        old.click()  # the last answer's status gone, so that the wait below sees this one's
    block().find_element(By.CSS_SELECTOR, ".execute").click()
    wait.until(lambda d: block().find_elements(By.CSS_SELECTOR, ".live-responses-table .response-col_status"))
    return block().find_elements(By.CSS_SELECTOR, ".live-responses-table .response-col_status")[-1].text.strip()
