"""Render a ctedge HTML page (report, evaluate/audit --html) in headless
Chromium and save a full-page screenshot to look at.

    python scripts/render_html.py runs/train-X/report.html --out report.png

Needs Chromium (Debian: `apt-get install chromium`). Exits 1 when Chromium
fails or the screenshot is blank (one colour), 2 when Chromium is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def chromium() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


def render(page: Path, out: Path, width: int = 1200, height: int = 5000) -> Path:
    binary = chromium()
    if binary is None:
        print("render_html: no Chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={out.resolve()}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG (default: PAGE.png)")
    parser.add_argument("--height", type=int, default=5000, help="Viewport height in pixels.")
    args = parser.parse_args()
    out = render(args.page, args.out or args.page.with_suffix(".png"), height=args.height)
    shot = cv2.imread(str(out))
    if shot is None or shot.std() < 1.0:
        print(f"render_html: {out} is blank", file=sys.stderr)
        sys.exit(1)
    background = shot[-1, -1].astype(int)
    rows = (abs(shot.astype(int) - background).max(axis=(1, 2)) > 8).nonzero()[0]
    print(f"{out}: {shot.shape[1]}x{shot.shape[0]} px, content down to row {rows.max()}")
    if rows.max() >= shot.shape[0] - 1:
        print("the page may be longer than the screenshot: raise --height", file=sys.stderr)


if __name__ == "__main__":
    main()
