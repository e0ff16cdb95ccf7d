"""The digit judge: a small classifier (ONNX, bundled) that reads generated digits, so a generator
can be scored per runtime and precision ("90% of the 7s read as 7") instead of eyeballed.

Torch-free (numpy, Pillow, onnxruntime): the app runtimes and the parity suite use it as is.
The network and its training live in ``dcae_edge.train_judge``; it never sees generated images.

    from dcae_edge.judge import Judge
    judge = Judge()                                   # dcae_edge/weights/digit-judge.onnx
    labels, confidence = judge.classify(images)       # images: N x 3 x H x W in [-1, 1], uint8 HWC, or PIL
    report = judge.score(images, wanted_labels)       # accuracy, per class
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

WEIGHTS = Path(__file__).parent / "weights"
JUDGE_ONNX = WEIGHTS / "digit-judge.onnx"
INPUT_SIZE = 64


def to_judge_input(images, size: int = INPUT_SIZE) -> np.ndarray:
    """Anything image-like -> float32 N x 3 x size x size in [-1, 1], resized with Pillow's antialiased
    bilinear filter (training used the same function, so both see identical pixels)."""
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3 and images.dtype != np.uint8:
        arr = ((np.clip(images, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(0, 2, 3, 1)
        pils = [Image.fromarray(a) for a in arr]
    elif isinstance(images, np.ndarray) and images.dtype == np.uint8:
        pils = [Image.fromarray(a) for a in (images if images.ndim == 4 else images[None])]
    else:
        pils = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
    out = np.stack([np.asarray(p.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), np.float32)
                    for p in pils])
    return (out / 127.5 - 1.0).transpose(0, 3, 1, 2).copy()


class Judge:
    def __init__(self, path: str | Path = JUDGE_ONNX, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no digit judge (train one: python -m dcae_edge.train_judge)")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        meta_path = path.with_suffix(".json")
        self.meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        self.class_names = self.meta.get("class_names", [str(i) for i in range(10)])
        # judges record the size they read (a 64 px judge confused thin 0s with 1s: the hole was 1 px)
        self.input_size = int(self.meta.get("input_size", INPUT_SIZE))

    def logits(self, images) -> np.ndarray:
        x = to_judge_input(images, self.input_size)
        return np.concatenate([self.session.run(None, {"image": x[i:i + 256]})[0] for i in range(0, len(x), 256)])

    def classify(self, images) -> tuple[np.ndarray, np.ndarray]:
        z = self.logits(images)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return p.argmax(1), p.max(1)

    def score(self, images, wanted) -> dict:
        """Accuracy of images meant to show ``wanted`` labels: overall and per class."""
        pred, conf = self.classify(images)
        wanted = np.asarray(wanted).reshape(-1)
        per_class = {self.class_names[c]: round(float((pred[wanted == c] == c).mean()), 4)
                     for c in sorted(set(wanted.tolist()))}
        return {"accuracy": round(float((pred == wanted).mean()), 4), "n": int(len(wanted)), "per_class": per_class,
                "predicted": pred.tolist(), "confidence": [round(float(c), 3) for c in conf]}


def semantic_score(generate, class_ids: list[int], per_class: int, judge: "Judge", seed: int = 0, thumb: int = 128):
    """Generate ``per_class`` samples of every class (one call per class, seeds ``seed + class``:
    every runtime starts from the same noise) and read them with the judge.
    ``generate(labels, seed) -> images`` (N x 3 x H x W in [-1, 1]). Returns (report, grid uint8 image:
    one row per class, wrong readings framed in red)."""
    rows, preds, wanted = [], [], []
    for c in class_ids:
        images = generate([c] * per_class, seed + c)
        p, _ = judge.classify(images)
        preds += p.tolist()
        wanted += [c] * per_class
        small = [np.array(Image.fromarray(((np.clip(im, -1, 1) + 1) * 127.5).round().astype(np.uint8).transpose(1, 2, 0))
                            .resize((thumb, thumb), Image.Resampling.BILINEAR)) for im in images]
        for tile, got in zip(small, p):
            if got != c:  # a red frame where the judge read another digit
                tile[:3], tile[-3:], tile[:, :3], tile[:, -3:] = (220, 30, 30), (220, 30, 30), (220, 30, 30), (220, 30, 30)
        rows.append(np.concatenate(small, 1))
    preds_a, wanted_a = np.array(preds), np.array(wanted)
    per = {judge.class_names[c]: round(float((preds_a[wanted_a == c] == c).mean()), 4) for c in class_ids}
    report = {"accuracy": round(float((preds_a == wanted_a).mean()), 4), "per_class": per, "samples": len(wanted),
              "per_class_samples": per_class, "seed": seed}
    return report, np.concatenate(rows, 0)


def fresh_render_accuracy(judge: "Judge", n: int = 200, seed: int = 1234, photos_dir: str | None = None) -> float:
    """Accuracy on freshly rendered digits in the fonts that ship inside matplotlib (held out from
    training, present wherever the package is installed: what the test suite re-checks)."""
    from .digits import load_background_photos, matplotlib_fonts, render_sample

    fonts = matplotlib_fonts()
    photos, _ = load_background_photos(photos_dir)
    images = [render_sample(i, "heldout", fonts, photos, seed=seed)[0] for i in range(n)]
    pred, _ = judge.classify(images)
    return float((pred == np.arange(n) % 10).mean())
