"""What every backend module shares: where its fp32 graph lives in the bundle, and the interface
the command drives (``fp32_runner``, ``prepare``, ``quantize``, ``rank``, ``save``)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

from . import CalibrationError
from .data import FeedSet, Runner
from .sensitivity import Attempt, Candidate

EXPORT_COMMANDS = {"onnxruntime": "export.onnx", "openvino": "export.openvino", "coreml": "export.coreml"}


@contextlib.contextmanager
def log_level(logger: str, level: int):
    """Temporarily raise a logger's level: the quantizers log a line per op or step."""
    log = logging.getLogger(logger)
    old = log.level
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(old)


def artifact_files(manifest: dict, artifact: dict) -> list[tuple[str, dict]]:
    """(path, {sha256, bytes}) of every file of an artifact, as recorded at export: a package's files lie
    in its folder, external weights (.onnx.data, an IR's .bin) are files of their own."""
    return [(key, meta) for key, meta in sorted(manifest.get("files", {}).items())
            if any(key == f or key.startswith(f + "/") for f in artifact["files"])]


def artifact_id(manifest: dict, artifact: dict) -> str:
    h = hashlib.sha256()
    for key, meta in artifact_files(manifest, artifact):
        h.update(f"{key}{meta['sha256']}".encode())
    return h.hexdigest()[:24]


class Backend:
    name = ""
    key = ""                          # artifact key written, e.g. "onnx/int8"
    sources: tuple[str, ...] = ()     # fp32 artifact keys it starts from, preferred first

    def __init__(self, bundle: Path, manifest: dict, args, work: Path):
        self.bundle, self.manifest, self.args, self.work = Path(bundle), manifest, args, Path(work)

    # ---- the fp32 graph
    def source_key(self, graph: str) -> str | None:
        arts = self.manifest["graphs"].get(graph, {}).get("artifacts", {})
        return next((k for k in self.sources if k in arts), None)

    def source_files(self, graph: str) -> list[Path]:
        key = self.source_key(graph)
        if key is None:
            raise CalibrationError(f"{graph}: the bundle has no {' / '.join(self.sources)} artifact to quantize; "
                                   f"export it first: python -m {EXPORT_COMMANDS[self.name]} --out {self.bundle} "
                                   f"--variant {self.manifest.get('variant')} --resolution {self.manifest.get('resolution')}"
                                   + (" --static" if not self.manifest.get("dynamic") else ""))
        return [self.bundle / f for f in self.manifest["graphs"][graph]["artifacts"][key]["files"]]

    def model_id(self, graph: str) -> str:
        """Checksums of every file of the fp32 graph (from the manifest; an IR's weights live in its
        .bin, a package's in a sub-folder): cache keys of derived sets use it."""
        return artifact_id(self.manifest, self.manifest["graphs"][graph]["artifacts"][self.source_key(graph)])

    def source_bytes(self, graph: str) -> int:
        """Bytes of the fp32 graph's files, weights included."""
        artifact = self.manifest["graphs"][graph]["artifacts"][self.source_key(graph)]
        return sum(meta["bytes"] for _, meta in artifact_files(self.manifest, artifact))

    def output_names(self, graph: str) -> list[str]:
        return [t["name"] for t in self.manifest["graphs"][graph]["outputs"]]

    # ---- implemented per backend
    def fp32_runner(self, graph: str) -> Runner:
        raise NotImplementedError

    def prepare(self, graph: str, calib: FeedSet) -> None:
        """Anything done once per graph before the exclusion rounds (pre-processing, ranges)."""

    def quantize(self, graph: str, excluded: list[str]) -> Attempt:
        raise NotImplementedError

    def rank(self, graph: str, attempt: Attempt, feeds: list[dict]) -> list[Candidate]:
        raise NotImplementedError

    def save(self, graph: str, attempt: Attempt, gdir: Path) -> list[Path]:
        raise NotImplementedError

    def settings(self) -> dict:
        """Recorded in the manifest next to each artifact."""
        return {}

    def describe_counts(self, counts: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in counts.items() if not isinstance(v, dict))
