"""Serve the browser app and one bundle on 127.0.0.1, with the headers threaded WASM needs.

    python -m runtimes.web --bundle exports/f64 [--port 8000]

Cross-origin isolation (COOP same-origin + COEP require-corp) lets onnxruntime-web use threads;
``.wasm``/``.mjs`` get their MIME types. Only the app, onnxruntime-web's files, the packaged
sample photos and the files the bundle's manifest lists are served; paths outside the bundle
are refused, and so is an ``.onnx`` over 2 GB (onnxruntime-web cannot parse it: export fp16/int8
or use external data) — each with a JSON message the page shows.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from dcae_edge.cli import port

WEB = Path(__file__).resolve().parent
ORT_DIST = WEB / "node_modules" / "onnxruntime-web" / "dist"
ASSETS = WEB.parents[1] / "dcae_edge" / "assets"
TWO_GB = 2 * 1024**3
APP_FILES = {"index.html", "app.js", "style.css"}
MIME = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
        ".html": "text/html; charset=utf-8", ".css": "text/css", ".onnx": "application/octet-stream",
        ".data": "application/octet-stream", ".ort": "application/octet-stream", ".jpg": "image/jpeg", ".png": "image/png"}


class Handler(SimpleHTTPRequestHandler):
    bundle: Path = Path(".")
    manifest_files: set = set()

    def log_message(self, fmt, *args):  # quiet: one line per error only
        if args and str(args[1])[:1] in "45":
            sys.stderr.write("runtimes.web: " + fmt % args + "\n")

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def error_json(self, code: int, message: str):
        body = json.dumps({"error": message}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_file(self, path: Path):
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", MIME.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        path = unquote(urlparse(self.path).path)
        if path in ("/", "/index.html"):
            return self.send_file(WEB / "index.html")
        rel = path.lstrip("/")
        if rel in APP_FILES or (rel.startswith("lib/") and rel.endswith(".js") and "/" not in rel[4:]):
            return self.send_file(WEB / rel) if (WEB / rel).is_file() else self.error_json(404, f"{rel}: not found")
        if rel.startswith("vendor/ort/"):
            f = ORT_DIST / rel[len("vendor/ort/"):]
            if "/" in rel[len("vendor/ort/"):] or not f.is_file():
                return self.error_json(404, f"{rel}: onnxruntime-web is not installed (run `npm ci` in runtimes/web)")
            return self.send_file(f)
        if rel.startswith("samples/"):
            f = ASSETS / rel[len("samples/"):]
            return self.send_file(f) if f.suffix == ".jpg" and f.parent == ASSETS and f.is_file() else self.error_json(404, "no such sample")
        if rel.startswith("bundle/"):
            return self.serve_bundle(rel[len("bundle/"):])
        return self.error_json(404, f"{path}: not found")

    def serve_bundle(self, rel: str):
        target = (self.bundle / rel).resolve()
        if self.bundle.resolve() not in target.parents and target != self.bundle.resolve():
            return self.error_json(403, f"{rel}: outside the bundle")
        if rel != "manifest.json" and rel not in self.manifest_files:
            return self.error_json(404, f"{rel} is not listed in the bundle's manifest")
        if not target.is_file():
            return self.error_json(404, f"{rel} is missing from the bundle folder; copy the whole bundle again")
        if target.suffix in (".onnx", ".ort") and target.stat().st_size > TWO_GB:
            return self.error_json(413, f"{rel} is {target.stat().st_size / 1e9:.2f} GB, over the 2 GB protobuf limit of "
                                   "onnxruntime-web: export fp16 or int8 artifacts, or export with external data")
        return self.send_file(target)


def make_server(bundle: Path, port: int = 8000, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    bundle = Path(bundle)
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        raise SystemExit(f"error: {bundle} has no manifest.json (export a bundle: python -m export.onnx --variant f64)")
    try:
        files = set(json.loads(manifest.read_text()).get("files", {}))
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {manifest} is corrupt ({e}); export the bundle again") from None
    handler = type("BundleHandler", (Handler,), {"bundle": bundle, "manifest_files": files})
    return ThreadingHTTPServer((host, port), partial(handler, directory=str(WEB)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--port", type=port, default=8000, help="0 = any free port")
    args = ap.parse_args(argv)
    if args.bundle.name == "manifest.json" and args.bundle.is_file():  # the manifest itself given: its bundle
        args.bundle = args.bundle.parent
    if not ORT_DIST.is_dir():
        print("warning: onnxruntime-web is not installed: run `npm ci` in runtimes/web (the page needs it)", file=sys.stderr)
    try:
        server = make_server(args.bundle, args.port)
    except OSError as e:
        print(f"error: cannot listen on 127.0.0.1:{args.port} ({e.strerror}); pass another --port", file=sys.stderr)
        return 2
    print(f"serving {args.bundle} at http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def serve_in_thread(bundle: Path) -> tuple[ThreadingHTTPServer, str]:
    """For tests and benchmarks: a server on a free port, in a daemon thread."""
    server = make_server(bundle, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


if __name__ == "__main__":
    raise SystemExit(main())
