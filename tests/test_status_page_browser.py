"""The status page in a real headless browser: Debian's chromium driven by Selenium and chromedriver.

``.ci/run`` installs ``chromium`` and ``chromium-driver``; where neither can be found this skips
with the reason. Selenium is told where the driver is, so it never downloads one.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from inferkit import Predictor, Router, TensorSpec
from inferkit.policies import Canary, CanaryDecision, Guard
from inferkit.server import Repository, ServedModel
from inferkit.server.run import InferenceServer

WAIT = 60  # seconds: a bound on every wait, never expected to be reached
SPEC = [TensorSpec("x", np.float32, (None, 4))]
OUT = [TensorSpec("y", np.float32, (None, 4))]
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")


def _binary(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
        if found:
            return found
    return None


@pytest.fixture(name="browser")
def _browser() -> Iterator[Any]:
    chromium, driver_path = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if chromium is None or driver_path is None:
        pytest.skip("no chromium and chromedriver here (.ci/run installs Debian's chromium and chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="inferkit-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            driver.set_page_load_timeout(WAIT)
            yield driver
        finally:
            driver.quit()


class _Candidate:
    """A model that answers until told to fail (a bad release, found by the canary's guard)."""

    def __init__(self) -> None:
        self.failing = threading.Event()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.failing.is_set():
            msg = "the candidate broke"
            raise RuntimeError(msg)
        return x * 3


def test_the_page_shows_models_and_follows_a_canary_while_traffic_runs(browser: Any) -> None:
    """No console errors; the models shown; a canary step and a rollback each within one refresh; a screenshot."""
    from selenium.webdriver.support.ui import WebDriverWait

    decisions: list[CanaryDecision] = []
    stepped, rolled_back = threading.Event(), threading.Event()

    def on_decision(decision: CanaryDecision) -> None:
        decisions.append(decision)
        {"step": stepped, "rollback": rolled_back}.get(decision.action, threading.Event()).set()

    candidate = _Candidate()
    one = Predictor.from_callable(lambda x: x * 2, inputs=SPEC, outputs=OUT, name="clf-1")
    two = Predictor.from_callable(candidate, inputs=SPEC, outputs=OUT, name="clf-2")
    canary = Canary(
        "1",
        "2",
        steps=(0.2, 0.5, 1.0),
        min_requests_per_step=20,
        min_seconds_per_step=5.0,  # a step outlasts a refresh (2 s): the page can show each one
        guard=Guard(max_error_rate=0.2),
        on_decision=on_decision,
    )
    repository = Repository(
        [
            ServedModel("digits", Predictor.from_callable(lambda x: x + 1, inputs=SPEC, outputs=OUT, name="digits")),
            ServedModel("clf", Router({"1": one, "2": two}, canary, seed=0, name="clf"), {"1": one, "2": two}),
        ]
    )
    server = InferenceServer(repository, port=0, grpc_port=None, grace=WAIT).start()
    base = f"http://127.0.0.1:{server.port}"
    stop = threading.Event()
    sent = [0]

    def traffic() -> None:  # bounded in count and time
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        deadline = time.monotonic() + 2 * WAIT
        with httpx.Client(base_url=base, timeout=WAIT) as c:
            while not stop.is_set() and sent[0] < 100_000 and time.monotonic() < deadline:
                c.post("/v2/models/clf/infer", json=body)
                c.post("/v2/models/digits/infer", json=body)
                sent[0] += 1
                stop.wait(0.005)  # a steady trickle, not a benchmark

    def polls() -> int:
        return int(browser.execute_script("return Number(document.body.dataset.polls || 0)"))

    def texts(selector: str) -> list[str]:
        # Found and read in one script: a refresh between a find and a read would leave a stale element.
        script = "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim())"
        return [str(t) for t in browser.execute_script(script, selector)]

    def shown(selector: str) -> str:
        found = texts(selector)
        return found[0] if found else ""

    thread = threading.Thread(target=traffic)
    try:
        browser.get(base + "/")
        wait = WebDriverWait(browser, WAIT)
        wait.until(lambda _: polls() >= 1)
        names = texts("[data-model] .model-name")
        assert names == ["clf", "digits"]
        assert shown('[data-split="clf"] .canary-state') == "running"
        assert shown('[data-split="clf"] .canary-step') == "0"
        thread.start()

        # One refresh: the poll under way when the decision happened may miss it; the next one shows it.
        assert stepped.wait(WAIT), f"no canary step after {sent[0]} requests"
        seen = polls()
        wait.until(lambda _: shown('[data-split="clf"] .canary-step') == "1" or polls() > seen + 2)
        assert shown('[data-split="clf"] .canary-step') == "1", f"not shown by poll {polls()} (decided at {seen})"

        candidate.failing.set()
        assert rolled_back.wait(WAIT), f"no rollback: {decisions}"
        seen = polls()
        wait.until(lambda _: shown('[data-split="clf"] .canary-state') == "rolled_back" or polls() > seen + 2)
        assert shown('[data-split="clf"] .canary-state') == "rolled_back"
        assert "max_error_rate" in shown('[data-split="clf"]')  # the decision's reason, in the table
        wait.until(lambda _: float(shown('[data-model="digits"] .rps') or 0) > 0)  # rates from two samples

        png = browser.get_screenshot_as_png()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        assert width >= 800
        assert height >= 600
        assert len(png) > 30_000, f"a {len(png)}-byte screenshot is a blank page"  # text and charts: far more

        errors = [e for e in browser.get_log("browser") if e["level"] in {"SEVERE", "ERROR"}]
        assert errors == []
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(WAIT)
        server.join(WAIT)
