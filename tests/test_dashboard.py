"""The dashboard in headless Chromium (Debian's chromium + chromedriver, driven by
Selenium) against a three-node devnet: it loads with no console errors, a submitted task
appears live, a killed node turns offline. Screenshots land in tests/artifacts/."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster, wait_until
from tests.test_tasks import MODEL, knows_model, serving

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "make test installs chromium and chromium-driver"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"dashboard-{name}.png"))


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, css)
    return " ".join(e.text for e in found)


def test_dashboard_live_in_headless_chromium(
    cluster: Cluster, models_dir: Path, browser: Any
) -> None:
    n1 = cluster.start(1, extra=serving(models_dir))
    n2 = cluster.start(2, bootstrap=n1, extra=serving(models_dir), wait=False)
    n3 = cluster.start(3, bootstrap=n1, extra=serving(models_dir))
    wait_until(lambda: knows_model(n1, 2), 20, "node 1 sees both peers")
    # The one-time link (`vcoin dashboard`) becomes an HttpOnly session cookie; the token
    # leaves the address bar.
    browser.get(n1.rpc.call("vcoin_dashboardUrl")["url"])
    assert browser.title == "VCoin node"
    assert browser.current_url == n1.info["rpc_url"] + "/dashboard"
    assert "vcoin_session" not in browser.execute_script("return document.cookie")
    for n in (n2, n3):
        wait_until(lambda n=n: "online" in text_of(browser, f'tr[data-peer="{n.info["peer_id"]}"]'),
                   15, "the peer rows")  # fmt: skip
    wait_until(lambda: text_of(browser, "#live") == "live", 10, "the WebSocket")
    assert n1.info["peer_id"][-8:] in text_of(browser, "#node")
    shot(browser, "cluster")

    # a task submitted elsewhere (RPC) shows up live, and completes
    req = {"model": MODEL, "input": "What is a Merkle tree?", "parameters": {"max_new_tokens": 12}}
    task_id = n1.rpc.call("vcoin_submitTask", req)["task_id"]
    row = f'tr[data-task="{task_id}"]'
    wait_until(lambda: text_of(browser, row), 10, "the task row")
    wait_until(lambda: "completed" in text_of(browser, row), 60, "the task completing")
    # a consensus round: its similarity matrix; an SLA
    req = {**req, "mode": "consensus", "replicas": 3}
    n1.rpc.call("vcoin_submitTask", req)
    wait_until(
        lambda: "similarity" in text_of(browser, "#consensus-body table"),
        60,
        "the similarity matrix",
    )
    n1.rpc.call("vcoin_slaCreate", {"customer": "acme", "max_latency_s": 30})
    wait_until(
        lambda: "compliant" in text_of(browser, 'tr[data-customer="acme"]'), 10, "the SLA row"
    )
    # each daemon runs its own embedded chain here: the section says which
    wait_until(lambda: "embedded" in text_of(browser, "#chain-body"), 30, "the chain section")
    shot(browser, "task")

    # The chat page: a turn streamed from a worker as it writes, then its verdict; a
    # consensus turn shows the vote.
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    wait_until(lambda: MODEL in text_of(browser, "#chat-model"), 15, "the chat's models")
    browser.find_element(By.ID, "chat-input").send_keys("Explain how a blockchain orders")
    browser.find_element(By.CSS_SELECTOR, "#chat-form button").click()
    states: list[tuple[str, int]] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        turn = browser.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]
        states.append((turn.get_attribute("data-state") or "", len(turn.text)))
        if states[-1][0] == "completed":
            break
        time.sleep(0.05)
    assert states[-1][0] == "completed", states[-5:]
    assert any(st == "streaming" and n > 0 for st, n in states), states  # text before the end
    assert "one node" in text_of(browser, ".turn.assistant .meta")
    Select(browser.find_element(By.ID, "chat-mode")).select_by_value("consensus")
    browser.find_element(By.ID, "chat-input").send_keys("And a Merkle tree?")
    browser.find_element(By.CSS_SELECTOR, "#chat-form button").click()
    wait_until(lambda: "consensus" in text_of(browser, ".turn.assistant:last-child .meta"),
               60, "the consensus turn's verdict")  # fmt: skip
    shot(browser, "chat")

    # node 3 dies: its row turns offline (and an alert appears)
    n3.proc.kill()
    n3.proc.wait()
    p3 = f'tr[data-peer="{n3.info["peer_id"]}"]'
    wait_until(lambda: "offline" in text_of(browser, p3), 20, "node 3 offline")
    wait_until(lambda: "peer_offline" in text_of(browser, "#alert-list"), 20, "the alert")
    shot(browser, "offline")
    time.sleep(0.5)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    # (the WebSocket of a killed node is not ours: every entry here is the dashboard's)
    assert severe == [], severe
