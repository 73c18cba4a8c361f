"""The web demo (scripts/web_demo.py): its plan, layout and turn helpers on every environment, and the whole app in a
real headless Chromium where Gradio, Selenium and Debian's `chromium chromium-driver` are installed (`make test-web`).
"""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import ROOT, load_file

web_demo = load_file("scripts/web_demo.py")
image_processing = load_file("image_processing_4khd.py")

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
TINY_TILE = (56, 14)
HD_NUM = 25  # the published config's default, which the slider starts at
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
# CI (.ci/run) sets this after installing the browser, so a broken install fails instead of skipping.
REQUIRE_BROWSER = os.environ.get("IXC_REQUIRE_BROWSER") == "1"


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (320, 200), (200, 30, 30)).save(path)
    return path


def test_plan_gives_grid_and_tokens_at_both_tile_sizes(image_file, tmp_path):
    tall = tmp_path / "tall.png"
    Image.new("RGB", (100, 700), "white").save(tall)
    text = web_demo.plan([str(image_file), str(tall)], HD_NUM, TINY_TILE)
    wide_rows, wide_cols, wide_tiny = image_processing.image_token_budget(320, 200, HD_NUM, *TINY_TILE)
    tall_rows, tall_cols, tall_tiny = image_processing.image_token_budget(100, 700, HD_NUM, *TINY_TILE)
    wide_336 = image_processing.image_token_budget(320, 200, HD_NUM)[2]
    tall_336 = image_processing.image_token_budget(100, 700, HD_NUM)[2]
    assert (wide_rows, wide_cols, wide_tiny, wide_336) == (4, 6, 111, 3661)
    assert f"| 1 | 320 x 200 | 4 x 6 | 24 + global | 111 | 3661 |" in text
    assert f"| 2 | 100 x 700 | {tall_rows} x {tall_cols} | {tall_rows * tall_cols} + global | {tall_tiny} | {tall_336} |" in text
    assert f"**{wide_tiny + tall_tiny} image tokens** at hd_num 25" in text
    assert f"({wide_336 + tall_336} with the published model's 336 px tiles)" in text


def test_plan_at_the_published_tile_has_one_cost_column(image_file):
    text = web_demo.plan([str(image_file)], 9, (336, 14))
    assert "| 1 | 320 x 200 | 2 x 3 | 6 + global | 1045 |" in text
    assert text.endswith("**1045 image tokens** at hd_num 9.")


def test_plan_without_images_and_with_a_bad_hd_num(image_file):
    assert web_demo.plan([], HD_NUM, TINY_TILE).startswith("No image")
    with pytest.raises(ValueError, match="hd_num"):
        web_demo.plan([str(image_file)], 0, TINY_TILE)


def test_layout_pictures_are_the_show_layout_drawings(image_file, tmp_path):
    pictures = web_demo.layout_pictures([str(image_file), str(image_file)], HD_NUM, TINY_TILE, tmp_path)
    expected, _ = load_file("scripts/show_layout.py").draw_layout(Image.open(image_file), HD_NUM, *TINY_TILE, 1200)
    assert len(pictures) == 2 and len(set(pictures)) == 2
    assert [Image.open(picture).size for picture in pictures] == [expected.size] * 2


@pytest.mark.parametrize(
    "question, history, num_images, expected",
    [
        ("Describe.", [], 2, "<ImageHere><ImageHere>Describe."),
        ("Compare <ImageHere> and <ImageHere>.", [], 2, "Compare <ImageHere> and <ImageHere>."),
        ("And the title?", [("<ImageHere>Describe.", "A page.")], 1, "And the title?"),
        ("Hello!", [], 0, "Hello!"),
    ],
)
def test_turn_query_puts_the_images_in_the_first_turn_only(question, history, num_images, expected):
    assert web_demo.turn_query(question, history, num_images, "<ImageHere>") == expected


# ---- The app in a real browser ----


def skip_without_browser():
    """Skip where the web extra is not installed (the test environments of the model); where it is, skip without
    Chromium, or fail when IXC_REQUIRE_BROWSER says the browser was installed."""
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as error:
        pytest.skip(f"{error.name} is not installed here; `make test-web` runs this test in .venv-web")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = "no /usr/bin/chromium or /usr/bin/chromedriver: `apt-get install chromium chromium-driver`"
        if REQUIRE_BROWSER:
            pytest.fail(reason)
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def web_app(tmp_path):
    """scripts/web_demo.py with its tiny model, served on a free port; yields its URL."""
    port, log = free_port(), tmp_path / "web_demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with log.open("w") as output:
        server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "web_demo.py"), "--port", str(port)],
                                  stdout=output, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the web demo did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*BROWSER_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_ask_and_see_the_streamed_reply_in_a_browser(image_file, monkeypatch, request):
    skip_without_browser()
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium uses the system driver and never fetches one
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    # Started only now, after the skip check, so a missing browser costs nothing.
    url, driver = request.getfixturevalue("web_app"), request.getfixturevalue("browser")
    wait = WebDriverWait(driver, 30)
    driver.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images input[type=file]"))

    driver.find_element(By.CSS_SELECTOR, "#images input[type=file]").send_keys(str(image_file))
    # The plan and the layout show before anything is sent.
    tiny_tokens, published_tokens = 111, 3661  # 320 x 200 at hd_num 25: 4 x 6 crops (test_plan_... above)
    plan = wait.until(lambda d: "image tokens at hd_num" in d.find_element(By.ID, "plan").text
                      and d.find_element(By.ID, "plan").text)  # fmt: skip
    assert f"{tiny_tokens} image tokens at hd_num {HD_NUM}" in plan
    assert f"({published_tokens} with the published model's 336 px tiles)" in plan
    layout = wait.until(lambda d: [image for image in d.find_elements(By.CSS_SELECTOR, "#layout img")
                                   if d.execute_script("return arguments[0].naturalWidth", image)])  # fmt: skip
    expected, _ = load_file("scripts/show_layout.py").draw_layout(Image.open(image_file), HD_NUM, *TINY_TILE, 1200)
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", layout[0]) == [
        expected.width, expected.height
    ]

    # Another hd_num: the plan follows before anything is sent (2 x 3 crops at hd_num 9).
    number = driver.find_element(By.CSS_SELECTOR, "#hd-num input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys("9", Keys.TAB)
    plan = wait.until(lambda d: "at hd_num 9" in d.find_element(By.ID, "plan").text and d.find_element(By.ID, "plan").text)
    assert image_processing.image_token_budget(320, 200, 9, *TINY_TILE) == (2, 3, 35)
    assert "35 image tokens at hd_num 9" in plan and "(1045 with the published model's 336 px tiles)" in plan

    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys("What is in the picture?")
    driver.find_element(By.ID, "send").click()
    status = wait.until(lambda d: re.search(r"time to first token (\d+) ms", d.find_element(By.ID, "status").text))
    assert int(status.group(1)) > 0
    users = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="user"]')
    bots = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')
    assert [element.text for element in users] == ["What is in the picture?"]
    assert len(bots) == 1 and len(bots[0].text.strip()) > 0
