"""Bundles: the folder an app loads. Atomic writes and the manifest.

Layout (optimum-style sub-folders, one per graph)::

    DIR/manifest.json
    DIR/vae_encoder/model.onnx            [model_fp16.onnx, model_int8.onnx, openvino_model.xml/.bin,
    DIR/vae_decoder/model.onnx             model.mlpackage/, ...]
    DIR/transformer/model.onnx

Every exporter works on a *copy* of the bundle in a temporary sibling folder (hard links, so it
is cheap) and swaps it in with renames only after validation passed: a crash, an exception or
Ctrl-C leaves the previous bundle untouched (or no bundle), never a half-written one.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from dcae_edge.files import sha256_file  # noqa: F401 (re-exported: calibration and tests import it from here)

BUNDLE_FORMAT = "dcae-edge-bundle"
MANIFEST_VERSION = 1


class BundleError(RuntimeError):
    """A bundle cannot be written or read; the message says what to do."""


def package_versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path}: corrupt manifest ({e})") from None
    if m.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a dcae-edge bundle manifest")
    return m


def check_output_folder(out: Path) -> None:
    """The target must be absent, empty, or one of our bundles; and its parent writable."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise BundleError(f"--out {out} exists and is not a folder")
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise BundleError(f"--out {out} is a non-empty folder that is not a dcae-edge bundle; "
                              "choose another folder or empty it (nothing was written)")
    parent = out.parent if out.parent != Path("") else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot create {parent}: {e}") from None
    if not os.access(parent, os.W_OK):
        raise BundleError(f"--out {out}: folder {parent} is not writable (nothing was written)")


def _copy_tree_linked(src: Path, dst: Path) -> None:
    """Copy a bundle using hard links (files are never modified in place, only replaced)."""
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            try:
                os.link(Path(root) / f, dst / rel / f)
            except OSError:
                shutil.copy2(Path(root) / f, dst / rel / f)


@contextlib.contextmanager
def bundle_lock(out: Path):
    """One writer per bundle: an flock on ``.NAME.lock`` next to it. A second export into the
    same folder waits for the first (and says so); it never interleaves with it."""
    import fcntl

    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(f".{out.name}.lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if os.environ.get("DCAE_EDGE_NO_WAIT"):
                raise BundleError(f"another process is writing {out} right now; wait for it or choose another --out") from None
            print(f"  another process is writing {out}: waiting for it to finish ...", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def remove_stale_staging(out: Path) -> None:
    """Staging copies left by a killed writer (only the lock holder creates them, so any found
    while holding the lock are orphans): removed, with a line saying how much space came back."""
    for stale in out.parent.glob(f".{out.name}.staging-*"):
        size = sum(f.stat().st_size for f in stale.rglob("*") if f.is_file() and f.stat().st_nlink == 1)
        shutil.rmtree(stale, ignore_errors=True)
        print(f"  removed {stale.name}, left by an interrupted run ({size / 1e6:.1f} MB freed)", flush=True)


@contextlib.contextmanager
def bundle_transaction(out: Path):
    """Yield a staging folder holding a copy of the current bundle; commit it on success.

    Commit = rename old -> backup, staging -> out, delete backup. A leftover backup from an
    interrupted commit is restored first; staging folders of killed runs are removed. The whole
    transaction holds the bundle's lock.
    """
    out = Path(out).absolute()
    check_output_folder(out)
    with bundle_lock(out):
        backup = out.with_name(f".{out.name}.previous")
        if backup.exists() and not out.exists():
            os.replace(backup, out)  # a commit was interrupted between its two renames
        elif backup.exists():
            shutil.rmtree(backup)
        remove_stale_staging(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
        try:
            if out.is_dir():
                _copy_tree_linked(out, stage)
            yield stage
            if out.exists():
                os.replace(out, backup)
            os.replace(stage, out)
            if backup.exists():
                shutil.rmtree(backup)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)


def fresh(path: Path) -> Path:
    """Unlink ``path`` (and its external-data sibling) before writing it: staging folders share
    inodes with the live bundle through hard links, so writing in place would modify the live
    bundle before the commit."""
    for p in (Path(path), Path(str(path) + ".data")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    return Path(path)


def new_manifest(variant: str, resolution: int, dynamic: bool) -> dict:
    from dcae_edge import __version__

    return {"format": BUNDLE_FORMAT, "manifest_version": MANIFEST_VERSION, "toolkit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "variant": variant,
            "resolution": resolution, "dynamic": dynamic, "graphs": {}, "files": {}}


def record_artifact(manifest: dict, stage: Path, graph: str, key: str, files: list[Path], info: dict) -> None:
    """Register artifact ``key`` (e.g. "onnx/fp32") of ``graph`` with its files' checksums."""
    rel_files = []
    for f in files:
        rel = f.relative_to(stage).as_posix()
        if f.is_dir():  # Core ML .mlpackage is a folder: hash every file inside
            for sub in sorted(p for p in f.rglob("*") if p.is_file()):
                r = sub.relative_to(stage).as_posix()
                manifest["files"][r] = {"sha256": sha256_file(sub), "bytes": sub.stat().st_size}
        else:
            manifest["files"][rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        rel_files.append(rel)
    g = manifest["graphs"].setdefault(graph, {"artifacts": {}})
    g["artifacts"][key] = {"files": rel_files, **info}


def strict_json(value):
    """``value`` with every non-finite float as the string "inf" / "-inf" / "nan": JSON has no Infinity or
    NaN, and browsers (JSON.parse) and most other languages reject a manifest that holds them (an exact
    comparison's PSNR is infinite). Python's float() still reads the strings back."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_manifest(manifest: dict, stage: Path) -> None:
    # drop checksums of files no longer present (an artifact was replaced)
    manifest["files"] = {k: v for k, v in manifest["files"].items() if (stage / k).exists()}
    text = json.dumps(strict_json(manifest), indent=1, default=str, allow_nan=False)
    (stage / "manifest.json").write_text(text)
