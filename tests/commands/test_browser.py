"""The web demo in a real headless Chromium: upload, ground, read the result picture and JSON.

Needs Debian's chromium + chromium-driver and the `serve` extra (Gradio) and selenium; `.ci/run`
installs them and runs `make test-browser`. Set VGLAW_SCREENSHOT=path to keep the screenshot,
VGLAW_SERVE_MODEL=folder to serve another model (the README's picture uses the demo's).
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tiny_ckpt, tmp_path_factory):
    pytest.importorskip("gradio")
    pytest.importorskip("selenium")
    if not (CHROMIUM and DRIVER):
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    from vglaw.models.loading import export_checkpoint

    model = os.environ.get("VGLAW_SERVE_MODEL") or str(export_checkpoint(tiny_ckpt,
                                                                          tmp_path_factory.mktemp("m") / "model"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vglaw.cli", "serve", "--model", model, "--port", str(port),
                               "--data", str(REPO / "data")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    for _ in range(120):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                pytest.fail(f"vglaw serve exited: {server.stdout.read()[-3000:]}")
            time.sleep(0.5)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1300", f"--user-data-dir={tmp_path_factory.mktemp('chrome')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.get(url)
    yield driver
    driver.quit()
    server.terminate()
    server.wait(timeout=30)


def wait_for(driver, condition, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(condition)


def test_upload_ground_and_read_the_result(page, shapes_root, tmp_path):
    from selenium.webdriver.common.by import By

    image = next((shapes_root / "images" / "shapes").glob("test_*.png"))
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
    page.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
    wait_for(page, lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    page.find_element(By.CSS_SELECTOR, "#texts textarea").send_keys("the red circle\nthe leftmost square")
    page.find_element(By.CSS_SELECTOR, "#ground").click()
    result = wait_for(page, lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#overlay img")
                                       if e.get_attribute("src")])[0]
    assert result.get_attribute("naturalWidth") not in (None, "0")
    panel = wait_for(page, lambda d: d.find_element(By.CSS_SELECTOR, "#json").text.count("box") >= 2 and
                     d.find_element(By.CSS_SELECTOR, "#json"))
    text = panel.text
    assert "the red circle" in text and "the leftmost square" in text and "mask_rle" in text
    shot = Path(os.environ.get("VGLAW_SCREENSHOT") or tmp_path / "serve.png")
    page.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_an_empty_expression_is_a_message_in_the_page(page):
    from selenium.webdriver.common.by import By

    box = page.find_element(By.CSS_SELECTOR, "#texts textarea")
    box.clear()
    box.send_keys(" \n ")
    page.find_element(By.CSS_SELECTOR, "#ground").click()
    wait_for(page, lambda d: "type at least one expression" in d.find_element(By.TAG_NAME, "body").text, 60)
    json.dumps({})  # the page stays up: the next request works
    box.send_keys("the blue square")
    page.find_element(By.CSS_SELECTOR, "#ground").click()
    wait_for(page, lambda d: "the blue square" in d.find_element(By.CSS_SELECTOR, "#json").text)


def test_the_page_grounds_the_uploaded_file_itself(tiny_ckpt, shapes_root, tmp_path):
    """Gradio's own image input saves an RGB copy of an upload; the page's hands over the file,
    so a 16-bit or transparent picture is grounded exactly as `vglaw predict` grounds it."""
    pytest.importorskip("gradio")
    import threading

    import numpy as np
    from gradio.components.image import ImageData
    from PIL import Image

    from vglaw.commands.serve import ground, image_input
    from vglaw.inference import Grounder

    rgb = np.asarray(Image.open(next((shapes_root / "images" / "shapes").glob("test_*.png"))).convert("RGB"))
    rgba = np.dstack([rgb, np.where(rgb.sum(-1) > 600, 0, 255).astype(np.uint8)])  # light pixels transparent
    upload = tmp_path / "upload.png"
    Image.fromarray(rgba, "RGBA").save(upload)
    received = image_input().preprocess(ImageData(path=str(upload), orig_name="photo.png"))
    assert Path(received).read_bytes() == upload.read_bytes()
    grounder = Grounder(str(tiny_ckpt))
    page = ground(grounder, threading.Lock(), received, "the red circle", False)[1]["results"]
    cli = grounder.predict(str(upload), ["the red circle"])[0].to_json()
    assert page[0]["box"] == cli["box"] and page[0]["mask_rle"] == cli["mask_rle"]
