"""The browser app: an onnxruntime-web page that reconstructs photos and generates images from a
bundle (``python -m runtimes.web --bundle exports/f64``). The page, its JavaScript (``lib/``:
portable noise, the samplers, bundle reading) and the stdlib server live here; onnxruntime-web
comes from npm (``npm ci`` in this folder, pinned by package-lock.json)."""
