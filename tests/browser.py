"""Headless Chromium driven over the DevTools protocol, for real-browser TLS tests.

Just enough of the protocol: navigate, wait for the load event, read each
main response's TLS details (``securityDetails``: protocol, cipher) and the
connection it came over, and read the page text. Debian's ``chromium`` runs
headless as root with ``--no-sandbox`` (design.md, fact 15). The browser is
always killed, with its whole process group, when the context ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import websocket

from tests.support import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--ignore-certificate-errors", "--disable-dev-shm-usage", "--remote-allow-origins=*",
)
START_TIMEOUT = 30
STEP_TIMEOUT = 30


@dataclass(frozen=True)
class Response:
    """One main-document response as the browser saw it."""

    url: str
    status: int
    protocol: str | None  # "TLS 1.3"
    cipher: str | None
    connection_id: int
    connection_reused: bool
    alpn: str | None  # what the network stack negotiated: "http/1.1", "h2"


class DevTools:
    """A WebSocket session with one page target."""

    def __init__(self, url: str) -> None:
        self._socket = websocket.create_connection(url, timeout=STEP_TIMEOUT, suppress_origin=True)
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def close(self) -> None:
        self._socket.close()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result; events that arrive meanwhile are kept."""
        self._next += 1
        ident = self._next
        self._socket.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            message = json.loads(self._socket.recv())
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)
        raise TimeoutError(f"{method}: no answer within {STEP_TIMEOUT} s")

    def wait_for(self, method: str, since: int = 0) -> dict[str, Any]:
        """The first event named ``method`` at or after index ``since`` of :attr:`events`."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            for event in self.events[since:]:
                if event["method"] == method:
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {method} event within {STEP_TIMEOUT} s")
            message = json.loads(self._socket.recv())
            if "method" in message:
                self.events.append(message)


class Browser:
    """One Chromium process and a DevTools session with its first page."""

    def __init__(self, process: subprocess.Popen[bytes], devtools: DevTools, net_log: Path) -> None:
        self.process = process
        self.devtools = devtools
        self.net_log = net_log
        devtools.call("Page.enable")
        devtools.call("Network.enable")
        # Each navigation asks the server again; connections and TLS sessions stay as they are.
        devtools.call("Network.setCacheDisabled", cacheDisabled=True)

    def navigate(self, url: str) -> Response:
        """Load ``url``; the main document's response once the page has loaded."""
        since = len(self.devtools.events)
        result = self.devtools.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise AssertionError(f"Chromium could not load {url}: {result['errorText']}")
        self.devtools.wait_for("Page.loadEventFired", since)
        for event in self.devtools.events[since:]:
            params = event["params"]
            if event["method"] == "Network.responseReceived" and params.get("type") == "Document":
                return _response(params["response"])
        raise AssertionError(f"no document response for {url}")

    def resumed_handshakes(self) -> list[bool]:
        """Whether each TLS handshake so far resumed, in order, as the browser's NetLog records it.

        Chromium's own view, independent of the server: each SSL_CONNECT
        event ends with ``is_resumed``. The log is streamed while the browser
        runs, so it is read as text rather than as one JSON document.
        """
        text = self.net_log.read_text(errors="replace") if self.net_log.exists() else ""
        return [value == "true" for value in re.findall(r'"is_resumed":\s*(true|false)', text)]

    def text(self) -> str:
        """The page's ``document.body.innerText``."""
        result = self.devtools.call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True)
        return str(result["result"].get("value", ""))


def _response(response: dict[str, Any]) -> Response:
    details = response.get("securityDetails") or {}
    return Response(
        url=response["url"],
        status=int(response["status"]),
        protocol=details.get("protocol"),
        cipher=details.get("cipher"),
        connection_id=int(response.get("connectionId", -1)),
        connection_reused=bool(response.get("connectionReused")),
        alpn=response.get("protocol"),
    )


def _page_socket(port: int, process: subprocess.Popen[bytes]) -> str:
    """The DevTools WebSocket URL of the browser's first page, once it listens."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"chromium exited with {process.returncode} before DevTools listened")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
                targets = json.loads(answer.read())
        except OSError:
            time.sleep(0.1)
            continue
        pages = [t for t in targets if t.get("type") == "page" and "webSocketDebuggerUrl" in t]
        if pages:
            return str(pages[0]["webSocketDebuggerUrl"])
        time.sleep(0.1)
    raise AssertionError(f"chromium's DevTools did not answer on port {port} within {START_TIMEOUT} s")


@contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium for the block; killed (with its children) afterwards."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed: run scripts/install-system-deps.sh")
    profile = tempfile.mkdtemp(prefix="sesscache-chromium-")
    port = free_port()
    net_log = Path(profile) / "net-log.json"
    process = subprocess.Popen(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
         f"--log-net-log={net_log}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the renderers go with it
    )
    devtools: DevTools | None = None
    try:
        devtools = DevTools(_page_socket(port, process))
        yield Browser(process, devtools, net_log)
    finally:
        if devtools is not None:
            try:
                devtools.close()
            except Exception:
                pass
        _kill_group(process)
        shutil.rmtree(profile, ignore_errors=True)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(wait)
            break
        except subprocess.TimeoutExpired:
            continue
    if process.poll() is None:
        process.kill()
        process.wait(5)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # renderers left behind by a clean exit
    except ProcessLookupError:
        pass
