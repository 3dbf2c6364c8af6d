"""The chat page of ``posttrain serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by selenium. Two tiny models side by side, a
streamed answer, the budget-forcing controls changing the answer, the export, no console errors.

``POSTTRAIN_SCREENSHOTS=1`` also writes the page's screenshot to ``docs/images/chat.png``."""

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from conftest import thinker_model

from posttrain.inference.engine import TransformersEngine
from posttrain.inference.serve import make_server
from posttrain.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def page(tmp_path_factory, addition_sft_model):
    webdriver = pytest.importorskip("selenium.webdriver")
    thinker = thinker_model(tmp_path_factory.mktemp("browser-think"))
    engines = {name: TransformersEngine(load_model(path), load_tokenizer(path), batch_size=8)
               for name, path in (("thinker", thinker), ("adder", addition_sft_model))}
    server = make_server(engines, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
    yield driver
    driver.quit()
    server.shutdown()


def wait_for(driver, condition, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = driver.execute_script(condition)
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {condition}")


def ask(driver, text: str) -> dict:
    """Send ``text`` to the selected models; when every reply has finished, ``{model: (text, stats)}``."""
    box = driver.find_element("id", "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()
    wait_for(driver, "return !document.getElementById('send').disabled && state.turns.length > 0")
    return driver.execute_script(
        "const t = state.turns[state.turns.length - 1];"
        "return Object.fromEntries(state.chosen.map(m => [m, [t.replies[m].text, t.replies[m].stats || '', t.replies[m].error || '']]));")


def set_field(driver, field: str, value: str) -> None:
    el = driver.find_element("id", field)
    el.clear()
    if value:
        el.send_keys(value)


def test_chat_page_streams_compares_and_applies_budget_forcing(page):
    driver = page
    wait_for(driver, "return document.querySelectorAll('#models input').length === 2")
    headers = [h.text for h in driver.find_elements("css selector", ".column header")]
    assert headers == ["thinker", "adder"]  # both models side by side
    # count the stream's updates of each reply as they arrive
    driver.execute_script("window.updates = {}; const orig = updateReply;"
                          "updateReply = (m, t) => { window.updates[m] = (window.updates[m] || 0) + 1; orig(m, t); };")
    first = ask(driver, "What is 3 plus 4?")
    assert all(text and not error for text, _, error in first.values()), first
    assert "tokens" in first["thinker"][1] and "tokens" in first["adder"][1]
    updates = driver.execute_script("return window.updates")
    assert updates["thinker"] >= 5, updates  # the answer arrived in pieces, not at once
    shown = driver.find_elements("css selector", ".column[data-model='thinker'] .msg.assistant .body")[-1].text
    assert shown.replace("\n", "") and shown.split()[0] in first["thinker"][0]

    set_field(driver, "max_thinking_tokens", "2")
    capped = ask(driver, "What is 3 plus 4?")
    assert "2 thinking tokens" in capped["thinker"][1] and "cut at the cap" in capped["thinker"][1]
    assert capped["thinker"][0] != first["thinker"][0]
    set_field(driver, "max_thinking_tokens", "")
    set_field(driver, "num_wait", "1")
    waited = ask(driver, "What is 3 plus 4?")
    assert "1 waits" in waited["thinker"][1] and "Wait" in waited["thinker"][0]

    exported = driver.execute_script("return exportJson()")
    assert set(exported["conversations"]) == {"thinker", "adder"}
    convo = exported["conversations"]["thinker"]
    assert [m["role"] for m in convo] == ["user", "assistant"] * 3 and convo[-1]["content"] == waited["thinker"][0]
    assert exported["settings"]["num_wait"] == 1

    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    shot = driver.get_screenshot_as_png()
    assert shot[:4] == b"\x89PNG"
    if os.environ.get("POSTTRAIN_SCREENSHOTS"):
        (ROOT / "docs" / "images").mkdir(exist_ok=True)
        (ROOT / "docs" / "images" / "chat.png").write_bytes(shot)
