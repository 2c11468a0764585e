"""Screenshots of pages in one headless Chromium, driven through the DevTools protocol, with
MLflow's assistant panel closed as a user leaves it after the first visit (it opens itself on
a fresh profile and covers a third of the runs table).

    python scripts/shoot.py OUT_DIR NAME URL [HEIGHT] [NAME URL [HEIGHT] ...]

Each page gets a few seconds to fetch its runs and draw (``--wait``); aiohttp comes with mlflow.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

WIDTH = 1800
#: The UI's versioned localStorage keys (``<key>_v<version>``, JSON values).
CLOSED_ASSISTANT = {
    "mlflow.assistant.panelOpen_v1": "false",
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _page_socket(port: int, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("shoot.py: chromium did not start")
        time.sleep(0.2)


async def _shoot(ws_url: str, out: Path, shots: list[tuple[str, str, int]], wait_s: float):
    ids = itertools.count(1)
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:

        async def call(method: str, **params):
            n = next(ids)
            await ws.send_json({"id": n, "method": method, "params": params})
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == n:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data.get("result", {})
            raise RuntimeError("chromium closed the connection")

        await call("Page.enable")
        prepared: set[str] = set()
        for name, url, height in shots:
            await call(
                "Emulation.setDeviceMetricsOverride",
                width=WIDTH,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            origin = url.split("#", 1)[0]
            if url.startswith("http") and origin not in prepared:  # storage is per origin
                await call("Page.navigate", url=origin)
                await asyncio.sleep(2)
                script = "".join(
                    f"localStorage.setItem({json.dumps(k)}, {json.dumps(v)});"
                    for k, v in CLOSED_ASSISTANT.items()
                )
                await call("Runtime.evaluate", expression=script)
                prepared.add(origin)
            await call("Page.navigate", url="about:blank")
            await call("Page.navigate", url=url)
            await asyncio.sleep(wait_s)
            shot = await call("Page.captureScreenshot", format="png")
            (out / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
            print(f"{out / name}.png  {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("shots", nargs="+", help="NAME URL [HEIGHT] ...")
    parser.add_argument("--wait", type=float, default=8.0, help="seconds a page gets to draw")
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or "chromium")
    args = parser.parse_args()
    shots, items = [], list(args.shots)
    while items:
        name, url = items.pop(0), items.pop(0)
        height = int(items.pop(0)) if items and items[0].isdigit() else 1100
        shots.append((name, url, height))
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="shoot_")
    browser = subprocess.Popen(
        [
            args.chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            f"--window-size={WIDTH},1100",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        asyncio.run(_shoot(_page_socket(port), args.out, shots, args.wait))
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
