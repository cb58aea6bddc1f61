"""Open a report page in headless Chromium: a PNG screenshot, or the DOM after its scripts ran.

Used by the report tests (the plots must really render: plotly draws an ``svg.main-svg``
per figure only when its JavaScript ran) and to make the README's picture::

    python -m infer_plan.reports.screenshot report.html report.png [WIDTH HEIGHT]

Chromium is Debian's ``chromium`` package; ``.ci/run`` installs it. The flags keep it
off the network (this machine's is closed) and out of the user's profile.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..core.errors import ConfigError

__all__ = ["dump_dom", "screenshot"]

_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=15000",  # let plotly finish drawing before the capture
)


def _chromium(page: Path, *extra: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        raise ConfigError("headless Chromium not found: install Debian's 'chromium' package (.ci/run does)")
    with tempfile.TemporaryDirectory(prefix="infer-plan-chromium-") as profile:
        return subprocess.run(
            [binary, *_FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )


def screenshot(page: Path, png: Path, width: int = 1200, height: int = 1900) -> Path:
    done = _chromium(page, f"--window-size={width},{height}", f"--screenshot={png.resolve()}")
    if not png.exists():
        raise ConfigError(f"chromium made no screenshot of {page}: {done.stderr.strip()[-300:]}")
    return png


def dump_dom(page: Path) -> str:
    """The page's DOM after its scripts ran."""
    return _chromium(page, "--dump-dom").stdout


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (2, 4):
        sys.exit("usage: python -m infer_plan.reports.screenshot PAGE.html OUT.png [WIDTH HEIGHT]")
    size = (int(args[2]), int(args[3])) if len(args) == 4 else (1200, 1900)
    print(screenshot(Path(args[0]), Path(args[1]), *size))
