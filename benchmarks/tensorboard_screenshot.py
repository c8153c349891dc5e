"""A screenshot of TensorBoard's images tab, taken with headless Chromium against a local ``tensorboard`` server.

    # writes runs/sphere/semi_objective/:
    lightning-amor fit --config recipes/_base/trainer.yaml --config recipes/sphere/semi_objective.yaml
    python benchmarks/tensorboard_screenshot.py --logdir runs/sphere/semi_objective/tensorboard \\
        --tag sphere_contours --out docs/images/tensorboard_sphere.png

It starts ``tensorboard --logdir <logdir> --host 127.0.0.1 --port <a free port>`` (the ``tensorboard`` of this
Python environment), waits until the server answers and its images plugin lists a tag containing ``--tag``,
opens the images dashboard (``#images``) filtered to that tag in headless Chromium driven by Playwright, ticks
"Show actual image size", waits until every image has loaded, saves the PNG and stops the server.

Needs the Python package ``playwright`` (in the ``dev`` extra) and a system Chromium (Debian: ``apt-get install
-y chromium``, giving ``/usr/bin/chromium``; or ``--chromium PATH`` / ``$CHROMIUM``); Playwright's own browser
download (``playwright install``) is not used. It runs without network access: Chromium's background services
(updates, sync) are switched off, as on a closed network their refused connections can stall the page.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
    "--disable-dev-shm-usage",
)


class ScreenshotError(RuntimeError):
    """The screenshot could not be taken (no Chromium, no TensorBoard, no matching image tag, nothing written)."""


def find_chromium(explicit: Optional[str] = None) -> str:
    """The path of a Chromium executable: ``explicit``, ``$CHROMIUM`` or the first of :data:`CHROMIUM_NAMES` on PATH."""
    candidates = [explicit] if explicit else ([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else [])
    candidates += [] if explicit else list(CHROMIUM_NAMES)
    for name in candidates:
        path = shutil.which(name) or (name if Path(name).is_file() and os.access(name, os.X_OK) else None)
        if path:
            return path
    raise ScreenshotError(
        f"no Chromium found (tried {', '.join(candidates)}): install it (Debian/Ubuntu: `apt-get install -y "
        f"chromium`) or pass --chromium /path/to/chromium"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a local http URL built here
        return json.loads(response.read().decode())


def wait_for_tags(base: str, tag: str, server: subprocess.Popen, timeout_s: float) -> list[str]:
    """Poll the server until its images plugin lists a tag containing ``tag``; return the matching tags."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ScreenshotError(f"tensorboard exited with status {server.returncode} before serving {base}")
        try:
            found = _get_json(f"{base}/data/plugin/images/tags")
        except (OSError, ValueError) as err:  # not listening yet, or still starting up
            last = err
        else:
            last = found
            matches = sorted({t for run in found.values() for t in run if tag in t}) if isinstance(found, dict) else []
            if matches:
                return matches
        time.sleep(0.5)
    raise ScreenshotError(f"tensorboard at {base} listed no image tag containing {tag!r} within {timeout_s:.0f} s "
                          f"(last answer: {last!r}); check --logdir and --tag")


def take_screenshot(
    logdir: Path, out: Path, tag: str = "sphere_contours", width: int = 1400, height: int = 900,
    chromium: Optional[str] = None, timeout_s: float = 120.0, actual_size: bool = True,
) -> list[str]:
    """Serve ``logdir`` with TensorBoard, screenshot its images dashboard filtered to ``tag`` into ``out`` (PNG).

    Returns the image tags shown. Raises :class:`ScreenshotError` when a step fails.
    """
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise ScreenshotError(
            "this script drives Chromium with the Python package playwright: pip install playwright (it is in "
            "lightning-amor's `dev` extra); it uses the system Chromium, so no browser download is needed"
        ) from err
    if not logdir.exists():
        raise ScreenshotError(f"--logdir {logdir} does not exist")
    browser_path = find_chromium(chromium)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="tb-screenshot-") as scratch:
        server_log = Path(scratch) / "tensorboard.log"
        with open(server_log, "w") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
                 "--port", str(port), "--reload_interval", "1"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            try:
                tags = wait_for_tags(base, tag, server, timeout_s)
            except ScreenshotError as err:
                raise ScreenshotError(f"{err}\ntensorboard's output:\n{server_log.read_text()[-3000:]}") from err
            url = f"{base}/?darkMode=false#images&tagFilter={urllib.parse.quote(tag)}"
            try:
                with sync_playwright() as playwright:
                    browser = playwright.chromium.launch(executable_path=browser_path, args=list(CHROMIUM_FLAGS))
                    try:
                        page = browser.new_page(viewport={"width": width, "height": height})
                        page.set_default_timeout(timeout_s * 1000)
                        page.goto(url)
                        if actual_size:
                            page.get_by_text("Show actual image size").click()
                        images = page.locator("img")  # Playwright's selectors pierce the dashboard's shadow DOM
                        _wait_for_images(page, images, timeout_s)
                        page.wait_for_timeout(500)  # the layout settles around the loaded images
                        page.screenshot(path=str(out))
                    finally:
                        browser.close()
            except PlaywrightError as err:
                raise ScreenshotError(f"Chromium ({browser_path}) failed on {url}: {err}") from err
            if not out.is_file() or out.stat().st_size == 0:
                raise ScreenshotError(f"Chromium wrote no screenshot to {out}")
            return tags
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


def _wait_for_images(page: object, images: object, timeout_s: float) -> None:
    """Wait until the page shows at least one image and every image has loaded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if images.evaluate_all("els => els.length > 0 && els.every(i => i.complete && i.naturalWidth > 0)"):
            return
        page.wait_for_timeout(200)
    raise ScreenshotError(f"the images dashboard showed no loaded image within {timeout_s:.0f} s")


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logdir", required=True, help="a TensorBoard log directory (a run, or a folder of runs)")
    parser.add_argument("--out", default="docs/images/tensorboard_sphere.png", help="the PNG to write")
    parser.add_argument("--tag", default="sphere_contours", help="show the image tags containing this text")
    parser.add_argument("--width", type=int, default=1400, help="the browser window's width in pixels")
    parser.add_argument("--height", type=int, default=900, help="the browser window's height in pixels")
    parser.add_argument("--chromium", default=None, help="the Chromium executable (default: found on PATH)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server and browser")
    parser.add_argument("--scaled", action="store_true",
                        help="show the images scaled to the cards (default: ticks 'Show actual image size')")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        tags = take_screenshot(Path(args.logdir), out, args.tag, args.width, args.height, args.chromium,
                               args.timeout, actual_size=not args.scaled)
    except ScreenshotError as err:
        raise SystemExit(f"tensorboard_screenshot: {err}") from err
    print(f"wrote {out} ({out.stat().st_size} bytes), showing {', '.join(tags)}")
    return out


if __name__ == "__main__":
    main()
