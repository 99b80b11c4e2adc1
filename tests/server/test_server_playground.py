"""The playground page, driven in real headless Chromium through chromedriver's W3C WebDriver API.

Debian's `chromium` and `chromium-driver` are installed by the fixture when missing (CI runs
as root with apt reachable); the test is skipped, with the reason, only when apt cannot run.
WebDriver is plain HTTP + JSON, so httpx drives it; no selenium needed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import wait_until

pytestmark = pytest.mark.browser

ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver element reference key
WAIT_S = 60


def _chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installing Debian's packages with apt when missing."""
    browser, driver = _chromium_binary(), shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("chromium/chromedriver missing and apt-get is unavailable (not Debian, or not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([apt, "update"], check=True, env=env, timeout=600, capture_output=True)
    subprocess.run(
        [apt, "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"],
        check=True, env=env, timeout=900, capture_output=True,
    )  # fmt: skip
    browser, driver = _chromium_binary(), shutil.which("chromedriver")
    assert browser and driver, "apt installed chromium but its binaries are not on PATH"
    return browser, driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriver:
    """The few W3C WebDriver commands the test needs."""

    def __init__(self, url: str, browser: str):
        self.http = httpx.Client(base_url=url, timeout=WAIT_S)
        options = {
            "binary": browser,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"],
        }
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self._ok(self.http.post("/session", json=caps))["sessionId"]

    def _ok(self, response: httpx.Response) -> dict:
        body = response.json()["value"]
        assert response.status_code == 200, body
        return body

    def cmd(self, method: str, path: str, payload: dict | None = None):
        return self._ok(self.http.request(method, f"/session/{self.session}{path}", json=payload))

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def run(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT_KEY]

    def type(self, css: str, text: str) -> None:
        element = self.find(css)
        self.cmd("POST", f"/element/{element}/clear", {})
        self.cmd("POST", f"/element/{element}/value", {"text": text})

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def wait_for(self, script: str, timeout_s: float = WAIT_S):
        """The first truthy value `script` returns in the page."""
        return wait_until(lambda: self.run(script), timeout=timeout_s, message=f"condition never held: {script}")

    def quit(self) -> None:
        self.http.delete(f"/session/{self.session}")
        self.http.close()


@pytest.fixture(scope="module")
def webdriver() -> Iterator[WebDriver]:
    browser, driver = ensure_chromium()
    port = _free_port()
    process = subprocess.Popen(
        [driver, f"--port={port}", "--allowed-ips=127.0.0.1", "--log-level=WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    def driver_ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError("chromedriver exited before it was ready")
        try:
            return httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"]
        except httpx.TransportError:
            return False  # not listening yet

    try:
        wait_until(driver_ready, timeout=30, message="chromedriver did not start")
        wd = WebDriver(url, browser)
        try:
            yield wd
        finally:
            wd.quit()
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
def test_the_playground_generates_an_image_after_a_click(live_server, webdriver):
    webdriver.get(f"{live_server.url}/")
    webdriver.wait_for("return document.body.dataset.state === 'ready'")
    models = webdriver.run("return [...document.querySelectorAll('#model option')].map(o => o.value)")
    assert {"teacher", "swift"} <= set(models)
    steps = webdriver.run("return [...document.querySelectorAll('#steps option')].map(o => o.value)")
    assert steps == ["1", "2", "4"]  # the default model's allowed steps

    webdriver.type("#prompt", "a small green star at the top")
    webdriver.type("#negative-prompt", "red")
    webdriver.type("#seed", "7")
    webdriver.click("#generate")

    state = webdriver.wait_for("const s = document.body.dataset.state; return s === 'done' || s === 'error' ? s : null")
    assert state == "done", webdriver.run("return document.getElementById('error').textContent")
    size = webdriver.run("const i = document.getElementById('image'); return [i.naturalWidth, i.naturalHeight]")
    assert size == [64, 64]
    timings = webdriver.run(
        "return Object.fromEntries([...document.querySelectorAll('#timings tr')]"
        ".map(r => [r.dataset.name, r.cells[1].textContent]))"
    )
    assert timings["seed"] == "7" and timings["model"] == "teacher"
    assert timings["denoise"].endswith(" ms") and timings["batch size"] == "1"
