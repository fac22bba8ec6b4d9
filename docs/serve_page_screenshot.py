"""Screenshot of the page of ``fastflow serve`` (docs/serve-page.png) with headless Chromium.

    python docs/serve_page_screenshot.py RUN_DIR [OUT.png] [IMAGE...]

Starts ``fastflow serve RUN_DIR`` on a free local port, opens the page, uploads the images (default:
two of bottle's test images from ../shared/data), waits for their cards and saves the screenshot.
Uses the same code as the browser test (tests/test_serve.py); needs Chromium, chromedriver and selenium.
"""

import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from serve_helpers import start_server, stop_server  # noqa: E402
from test_serve import BOTTLE, drive_page  # noqa: E402


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    run_dir = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else str(REPO / "docs" / "serve-page.png")
    images = sys.argv[3:] or [str(BOTTLE / "broken_large" / "000.png"), str(BOTTLE / "good" / "001.png")]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server([run_dir], Path(tmp) / "serve.log")
        try:
            cards = drive_page(url, images, out, size=(1100, 760))
        finally:
            stop_server(proc)
    for card in cards:
        print(card["name"], card["decision"], card["score"], card["threshold"])
    print(out)


if __name__ == "__main__":
    main()
