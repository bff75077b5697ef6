"""A real headless Chromium (Debian's package), driven over the DevTools protocol: navigate, run script, screenshot.

Enough for the pages people look at (Label Studio's labeling page, the dashboard) to be checked as a
browser renders them, scripts and all. ``./scripts/test`` installs Chromium.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests


class Browser:
    def __init__(self, width: int = 1366, height: int = 900):
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            pytest.fail("Chromium is missing: ./scripts/test installs it (Debian package `chromium`)")
        self.profile = tempfile.mkdtemp(prefix="chromium-")
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--window-size={width},{height}", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.time() + 30
        assert self.process.stderr is not None
        while port is None and time.time() < deadline:
            line = self.process.stderr.readline()
            found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            port = int(found.group(1)) if found else None
        if port is None:
            self.close()
            raise AssertionError("Chromium did not open its DevTools port within 30 s")
        import websocket  # websocket-client

        page = next(t for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                    if t["type"] == "page")
        self.socket = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        # the page itself width × height (the window size includes the headless window's frame)
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params: Any) -> dict:
        call = next(self.ids)
        self.socket.send(json.dumps({"id": call, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == call:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def goto(self, url: str, settle: float = 0.5) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout=60)
        time.sleep(settle)

    def evaluate(self, script: str) -> Any:
        result = self.send("Runtime.evaluate", expression=script, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"script failed: {result['exceptionDetails'].get('text')}: {script[:200]}")
        return result["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 60) -> Any:
        """Poll a script until it is truthy (pages that render after load, like Label Studio's)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.evaluate(condition)
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"never true within {timeout} s: {condition}")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        try:
            self.socket.close()
        except Exception:
            pass
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)
