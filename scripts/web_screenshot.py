"""The README's browser screenshot: serve a bundle, reconstruct a held-out photo and generate digits
in headless Debian Chromium through the page's controls, save the page as a PNG.

    python scripts/web_screenshot.py --bundle exports/f64 --photo data/photos/eval/<file>.jpg --out docs/web-screenshot.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WEB = ROOT / "runtimes" / "web"


def main():
    from runtimes.web.__main__ import serve_in_thread

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--photo", required=True, type=Path)
    ap.add_argument("--classes", default="3, 1, 4, 1, 5, 9", help="'none': reconstruct only")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    node, chromium = shutil.which("node"), shutil.which("chromium")
    if not (node and chromium and (WEB / "node_modules").is_dir()):
        raise SystemExit("error: needs node, Debian's chromium and `npm ci` in runtimes/web")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(args.photo, Path(tmp) / "photo.jpg")
        server, url = serve_in_thread(args.bundle)
        try:
            res = subprocess.run([node, str(WEB / "test" / "screenshot.mjs"), url, tmp, args.classes], cwd=WEB,
                                 capture_output=True, text=True, timeout=900, env={"CHROMIUM": chromium, "PATH": "/usr/bin:/bin"})
        finally:
            server.shutdown()
        if res.returncode:
            raise SystemExit(f"error: the page failed:\n{res.stderr[-3000:]}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "screenshot.png", args.out)
    print(json.dumps(json.loads(res.stdout.strip().splitlines()[-1])["stats"]), "->", args.out)


if __name__ == "__main__":
    main()
