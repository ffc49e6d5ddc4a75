"""`mllm web`, end to end: the command serves the shipped tiny model on a free loopback port and a real headless
Chromium, driven by Selenium, uses the page the way a person would (upload an image, chat, ground an expression,
draw a synthetic scene and judge an answer against its ground truth). The event handlers are also called directly
for what a browser cannot see reliably (that an answer arrives in several pieces).

Screenshots go to the test's tmp_path; with MLLM_SAVE_SCREENSHOTS=1 the full page is also saved as
docs/img/web_demo.png (the README's picture).
"""

import io
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SCENE_SEED = 7  # a scene of the built-in world; its first object is the one the test grounds
SHOWN_SEED = 15  # the scene "New synthetic scene" draws: square, five objects
WAIT = 30  # seconds any one step may take on a busy two-core machine
PRED_COLOUR = (230, 0, 0)  # mllm.eval.grounding_draw: the model's box
GT_COLOUR = (0, 200, 0)  # ... and the true one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scene(seed: int = SCENE_SEED):
    from mllm.world import scenes

    return scenes.render_scene(scenes.sample_scene(random.Random(seed), f"test-{seed}"))


def expression_of(scene_, rng=None) -> str:
    from mllm.world import scenes

    for index in range(len(scene_.objects)):
        text = scenes.referring_expression(scene_, index, rng or random.Random(0))
        if text:
            return text
    raise AssertionError("no nameable object in the test scene")


# ---- the handlers, without a browser -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    import torch

    from mllm.model.loading import default_model_dir, load_pretrained
    from mllm.serve.web import WebDemo

    return WebDemo(*load_pretrained(default_model_dir(), dtype=torch.float32, device="cpu"))


def test_chat_streams_answers_and_refuses_mistakes_politely(demo, tmp_path):
    image, _ = scene()
    path = tmp_path / "scene.png"
    image.save(path)
    items = [(str(path), None)]

    steps = list(demo.chat("Describe the image in detail.", items, [], "greedy", 0.7, 0.8, 48))
    texts = [turns[-1]["content"] for turns, _, _ in steps[1:-1]]
    assert len(texts) > 2 and texts[0] and all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts
    turns, box, status = steps[-1]
    assert [t["role"] for t in turns] == ["user", "assistant"] and box == "" and "greedy" in status

    beam = list(demo.chat("What is in the image?", items, turns, "beam", 0.7, 0.8, 24))
    assert len(beam) == 3 and len(beam[-1][0]) == 4 and beam[-1][0][-1]["content"]  # whole, after the 2nd turn

    assert "Add an image first" in next(demo.chat("Hello?", [], [], "greedy", 0.7, 0.8, 8))[2]
    assert "Type a question first" in next(demo.chat("   ", items, [], "greedy", 0.7, 0.8, 8))[2]
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    assert "Cannot use that" in next(demo.chat("Hi", [(str(tmp_path / "broken.png"), None)], [], "greedy",
                                               0.7, 0.8, 8))[2]
    assert "Type what to find" in demo.ground(" ", items, 0, None)[2]
    assert "Draw a synthetic scene first" in demo.sample_expression(None)[1]


def test_a_typed_expression_finds_its_true_object_only_when_it_names_exactly_one():
    from mllm.serve.web import SceneState, scene_truth_markdown, true_object

    state = SceneState(SHOWN_SEED, scene(SHOWN_SEED)[1])  # green circle, yellow arrow, three triangles
    assert true_object(state, "The Orange Triangle.") == (2, "")
    assert true_object(state, "the purple triangle on the right") == (3, "")
    assert "fits 0 objects" in true_object(state, "the purple triangle on the left")[1]
    assert "fits 0 objects" in true_object(state, "the red star")[1]
    assert "not in the scene world's words" in true_object(state, "that blue thing")[1]
    assert true_object(None, "the red star") == (None, "")
    truth = scene_truth_markdown(state)
    assert "| 3 | orange | triangle | in the center |" in truth and "five objects" in truth


# ---- the command, in a browser -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "mllm.cli", "web", "--port", str(port), "--device", "cpu"],
                               cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"mllm web exited with {process.returncode}:\n{process.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - start > 90:
                pytest.fail("mllm web did not answer HTTP within 90 s")
            time.sleep(0.1)
        print(f"\nmllm web answered HTTP {time.perf_counter() - start:.1f} s after the process started")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent (CI installs Debian's chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


class Page:
    """The demo's page as the test sees it: elements by id, text by id, waits that fail with what was on screen."""

    def __init__(self, driver, shots: Path):
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.shots, self.By, self.WebDriverWait = driver, shots, By, WebDriverWait

    def find(self, css: str):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def present(self, css: str):
        """The element once it is on the page: gradio renders its components one after another, so an element
        next to one already found may not exist yet (a CI run failed on #question right after #images)."""
        return self.until(f"{css} on the page", lambda: self.find(css))

    def text(self, elem_id: str) -> str:
        return self.find(f"#{elem_id}").text

    def until(self, what: str, condition, timeout: float = WAIT):
        try:
            return self.WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(lambda _: condition())
        except Exception as err:
            self.shot("failed")
            raise AssertionError(f"waited {timeout} s for {what}; screenshot in {self.shots}") from err

    def wait_text(self, elem_id: str, pattern: str, timeout: float = WAIT) -> str:
        self.until(f"#{elem_id} to match {pattern!r}", lambda: re.search(pattern, self.text(elem_id)), timeout)
        return self.text(elem_id)

    def type_into(self, elem_id: str, text: str):
        field = self.present(f"#{elem_id} textarea, #{elem_id} input")
        field.clear()
        field.send_keys(text)

    def click(self, elem_id: str):
        self.present(f"#{elem_id}").click()

    def tab(self, label: str):
        self.driver.find_element(self.By.XPATH, f"//button[@role='tab' and normalize-space()='{label}']").click()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def image_of(self, css: str) -> Image.Image:
        """The picture an <img> shows, fetched the way the browser did."""
        src = self.find(css).get_attribute("src")
        with urllib.request.urlopen(src, timeout=10) as response:
            return Image.open(io.BytesIO(response.read())).convert("RGB")


def count_colour(image: Image.Image, colour) -> int:
    return int((np.asarray(image) == np.array(colour, dtype=np.uint8)).all(axis=-1).sum())


def test_web_demo_in_a_real_browser(server, browser, tmp_path):
    page = Page(browser, tmp_path)
    browser.get(server)
    page.until("the page", lambda: page.find("#images input[type=file]"))

    # A question before any image: a friendly line, no traceback.
    page.type_into("question", "What is this?")
    page.click("send")
    page.wait_text("chat-status", "Add an image first")

    image, scene_ = scene()
    upload = tmp_path / "scene.png"
    image.save(upload)
    page.find("#images input[type=file]").send_keys(str(upload))
    page.wait_text("chat-status", "New images")
    page.until("the uploaded image in the gallery", lambda: page.find("#images img"))

    page.type_into("question", "Describe the image in detail.")
    page.click("send")
    status = page.wait_text("chat-status", r"greedy, 1 image, [\d.]+ s", timeout=60)
    bot = browser.find_elements(page.By.CSS_SELECTOR, "#chatbot [data-testid='bot']")
    assert bot and bot[-1].text.strip() and "(no answer)" not in bot[-1].text, status

    # A second turn, sampled: the sampling controls appear with the choice.
    browser.find_element(page.By.XPATH, "//*[@id='decoding']//label[normalize-space()='sample']").click()
    page.until("the temperature slider", lambda: page.find("#temperature").is_displayed())
    page.type_into("question", "What colour is the largest object?")
    page.click("send")
    page.wait_text("chat-status", r"sample, 1 image, [\d.]+ s", timeout=60)
    bot = browser.find_elements(page.By.CSS_SELECTOR, "#chatbot [data-testid='bot']")
    assert len(bot) == 2 and bot[-1].text.strip()
    page.shot("1_chat")

    page.tab("Grounding")
    expression = expression_of(scene_)
    page.type_into("expression", expression)
    page.click("find")
    answer = page.wait_text("ground-answer", r"\*?Box", timeout=60)
    match = re.search(r"Box \(red\):\s*\[([-\d., ]+)\] pixels", answer)
    assert match, answer
    x0, y0, x1, y1 = (float(v) for v in match.group(1).split(","))
    assert 0 <= x0 <= x1 <= image.width and 0 <= y0 <= y1 <= image.height, answer
    page.until("the drawn picture", lambda: page.find("#ground-image img"))
    drawn = page.image_of("#ground-image img")
    assert count_colour(drawn, PRED_COLOUR) > 20  # the red box: a colour no scene object has
    page.shot("2_grounding")

    page.type_into("scene-seed", "seven")
    page.click("new-scene")
    page.wait_text("ground-status", "The seed must be a whole number")
    page.type_into("scene-seed", str(SHOWN_SEED))  # a seed makes the scene (and the README's picture) repeatable
    page.click("new-scene")
    truth = page.wait_text("scene-truth", f"Ground truth of scene {SHOWN_SEED} ")
    assert re.search(r"(red|green|blue|yellow|purple|orange)\s+\w+\s+(in|on|at) the", truth), truth
    page.wait_text("ground-status", "New scene")
    page.click("sample-expression")
    page.wait_text("ground-status", "Object \\d+ of the ground truth table")
    page.click("find")
    answer = page.wait_text("ground-answer", "True box \\(green\\)", timeout=60)
    assert re.search(r"IoU \d\.\d\d", answer), answer
    page.until("the picture of the new scene", lambda: count_colour(page.image_of("#ground-image img"), GT_COLOUR))
    full = page.shot("3_scene_truth")

    if os.environ.get("MLLM_SAVE_SCREENSHOTS"):
        target = ROOT / "docs" / "img" / "web_demo.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(full, target)

    # Emptying the gallery takes the scene (and its truth) away with it.
    page.find("#images button[aria-label='Clear']").click()
    page.wait_text("scene-truth", "No synthetic scene in the gallery")
    page.wait_text("ground-status", "No images")
