"""The chat page of ``posttrain serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by selenium. Two tiny models side by side, a
streamed answer, the budget-forcing controls changing the answer, the export, no console errors; the
server has an API key, which the page takes from its address (``#key=``) or asks for.

``POSTTRAIN_SCREENSHOTS=1`` also writes the page's screenshot to ``docs/images/chat.png``."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import thinker_model

from posttrain.inference.engine import TransformersEngine
from posttrain.inference.serve import start_server
from posttrain.models import load_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
KEY = "page-test-key-42"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def page(driver, tmp_path_factory, addition_sft_model):
    thinker = thinker_model(tmp_path_factory.mktemp("browser-think"))
    engines = {name: TransformersEngine(load_model(path), load_tokenizer(path), batch_size=8)
               for name, path in (("thinker", thinker), ("adder", addition_sft_model))}
    server = start_server(engines, api_key=KEY)
    driver.get(f"{server.url}/#key={KEY}")
    driver.server_url = server.url
    yield driver
    server.close()


def screenshot(driver, name: str) -> bytes:
    shot = driver.get_screenshot_as_png()
    if os.environ.get("POSTTRAIN_SCREENSHOTS"):
        (ROOT / "docs" / "images").mkdir(exist_ok=True)
        (ROOT / "docs" / "images" / name).write_bytes(shot)
    return shot


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
    assert screenshot(driver, "chat.png")[:4] == b"\x89PNG"


def test_chat_page_asks_for_the_key_or_takes_it_from_its_address(page):
    driver = page
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{driver.server_url}/")
    # the 401 shows the key box first and the refusal's message right after: wait for both
    wait_for(driver, "return !document.getElementById('keybox').hidden"
                     " && document.getElementById('models').textContent.includes('valid API key')")
    driver.find_element("id", "apikey").send_keys("wrong-key-123")
    driver.find_element("id", "usekey").click()
    time.sleep(0.5)
    assert driver.execute_script("return document.querySelectorAll('#models input').length") == 0
    driver.find_element("id", "apikey").send_keys(KEY)
    driver.find_element("id", "usekey").click()
    wait_for(driver, "return document.querySelectorAll('#models input').length === 2")
    assert driver.execute_script("return document.getElementById('keybox').hidden")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{driver.server_url}/#key={KEY}")
    wait_for(driver, "return document.querySelectorAll('#models input').length === 2")
    assert driver.execute_script("return location.hash") == ""  # the key leaves the address bar
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe and all("401" in m for m in severe)  # the refused tries, nothing else


def fake_run(root: Path) -> tuple[dict, list[dict]]:
    """A run's outputs as posttrain run leaves them: SFT (loss), RLVR (reward, verified, KL, length),
    two evaluations and an evaluation over checkpoints."""
    summary, stages = [], []
    for i, (name, kind) in enumerate((("eval-base", "eval"), ("sft", "sft"), ("eval-sft", "eval"), ("rlvr", "rlvr"),
                                      ("eval-rlvr", "eval"))):
        out = root / name
        out.mkdir(parents=True)
        entry = {"stage": name, "kind": kind, "output_dir": str(out), "skipped": False, "seconds": 10.0 + i}
        if kind == "eval":
            entry["results"] = {"gsm8k": {"accuracy": [0.1, 0.3, 0.45][i // 2], "instances": 100}}
        else:
            rl = kind == "rlvr"
            rows = [{"step": s, **({"reward": 0.2 + 0.05 * s, "verified": 0.1 * s, "kl": 0.01 * s,
                                    "completion_tokens": 40 - s} if rl else {"loss": 2.0 / s})} for s in range(1, 8)]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            entry["metrics"] = {"loss": 0.5, "num_input_tokens_seen": 12345, **({"reward": 0.55} if rl else {})}
            (out / "manifest.json").write_text(json.dumps({
                "model_license": "apache-2.0", "data": [{"path": f"data/{name}.jsonl", "license": "MIT"}],
                "contamination": {"against": {"gsm8k": 100}, "records": 50, "tasks": {"gsm8k": {"flagged": 1}}}}))
        summary.append(entry)
        stages.append({"name": name, "stage": kind, "config": {"learning_rate": 1e-5} if kind != "eval" else {"limit": 100}})
    from posttrain.eval import plots

    fig, ax = plots.figure()
    ax.plot([1, 2], [0.3, 0.4])
    plots.save(fig, root / "eval-rlvr" / "curve.png")
    return {"output_dir": str(root), "stages": stages}, summary


def test_run_report_is_a_page_with_tables_curves_and_folded_configs(driver, tmp_path):
    from posttrain.report import write_report

    recipe, summary = fake_run(tmp_path / "run")
    write_report(tmp_path / "run", recipe, summary)
    driver.get_log("browser")  # drop what earlier pages logged: this test reads the report's own
    driver.get((tmp_path / "run" / "report.html").as_uri())
    wait_for(driver, "return document.readyState === 'complete'")
    images = driver.execute_script("return [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    assert images == [["loss-sft.png", True], ["rl-rlvr.png", True], ["eval-curve-eval-rlvr.png", True]]
    headings = [h.text for h in driver.find_elements("css selector", "h2")]
    assert headings == ["Stages", "Curves and configs", "Contamination", "Licenses"]
    cells = driver.execute_script("return [...document.querySelectorAll('table')[0].rows].slice(1).map(r => [...r.cells].map(c => c.innerText))")
    assert [c[0] for c in cells] == ["eval-base", "sft", "eval-sft", "rlvr", "eval-rlvr"]
    assert cells[2][3] == "+0.200" and cells[4][3] == "+0.150" and cells[1][4] == "12,345"
    assert "# Run report" not in driver.find_element("tag name", "body").text  # rendered, not markdown
    assert len(driver.find_elements("css selector", "details")) == 5
    assert "learning_rate" in driver.execute_script("return document.querySelectorAll('details pre')[1].textContent")
    assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
