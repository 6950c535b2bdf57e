"""Render the README's pictures of examples/llama_tiny.yaml with headless Chromium.

    .venv/bin/python docs/images/make_pictures.py

timeline.png: the predicted timeline on 2 workers (the Gantt chart of `tilec inspect
--html`, the same tasks and times `--trace` writes as Perfetto JSON); report.png: the
top of the HTML report. Needs /usr/bin/chromium (`make test` installs it with apt-get).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tilec.api  # noqa: E402
from tilec.inspect import predicted_timeline, summary  # noqa: E402
from tilec.viz.html import report_html, timeline_html  # noqa: E402

CHROMIUM = "/usr/bin/chromium"


def screenshot(page: Path, out: Path, width: int, height: int) -> None:
    profile = Path(tempfile.mkdtemp(prefix="tilec-chromium-"))
    try:
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", f"--user-data-dir={profile}",
                        f"--window-size={width},{height}", f"--screenshot={out}",
                        page.as_uri()], check=True, capture_output=True, timeout=120)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    engine = tilec.api.compile(str(ROOT / "examples/llama_tiny.yaml")).data
    timeline = predicted_timeline(engine)
    with tempfile.TemporaryDirectory() as tmp:
        pages = {"timeline": timeline_html(timeline, "llama_tiny: predicted timeline on 2 "
                                                     "CPU workers"),
                 "report": report_html(summary(engine), timeline)}
        sizes = {"timeline": (1160, 210), "report": (1160, 900)}
        for name, text in pages.items():
            page = Path(tmp) / f"{name}.html"
            page.write_text(text)
            screenshot(page, ROOT / "docs/images" / f"{name}.png", *sizes[name])
            print(f"wrote docs/images/{name}.png")


if __name__ == "__main__":
    main()
