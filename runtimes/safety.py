"""A bundle is something people download: nothing it names may lead outside its folder.

Refused: manifest paths that are absolute, climb out with ``..``, or resolve (through a symlink)
to a place outside the bundle; ONNX external-data locations likewise (read from the model's
protobuf here, with a minimal wire-format walker: no onnx package needed, nothing loaded).
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath


class UnsafeBundle(ValueError):
    """The bundle names a file outside itself."""


def check_relative(bundle: Path, rel: str, what: str) -> Path:
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":") or ".." in p.parts:
        raise UnsafeBundle(f"{bundle}: {what} {rel!r} points outside the bundle (absolute or '..'); refusing to open it")
    root = bundle.resolve()
    target = (bundle / rel).resolve()
    if target != root and root not in target.parents:
        raise UnsafeBundle(f"{bundle}: {what} {rel!r} resolves to {target}, outside the bundle (a symlink?); refusing to open it")
    return target


def check_manifest_paths(bundle: Path, manifest: dict) -> None:
    for rel in manifest.get("files", {}):
        check_relative(bundle, rel, "file")
    for graph, info in manifest.get("graphs", {}).items():
        for key, art in info.get("artifacts", {}).items():
            for rel in art.get("files", []):
                check_relative(bundle, rel, f"{graph} {key} file")


# ---------------------------------------------------------------------------------------------- ONNX
def _varint(buf, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise UnsafeBundle("malformed protobuf varint")


def _fields(buf, start: int, end: int):
    """(field number, start, end) of the length-delimited fields in buf[start:end]."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > end:
                raise UnsafeBundle("truncated protobuf field")
            yield field, i, i + n
            i += n
        else:
            raise UnsafeBundle(f"malformed protobuf (wire type {wire})")


def external_data_locations(onnx_path: Path) -> list[str]:
    """``location`` of every external-data tensor of the main graph (initializers, sparse ones)."""
    buf = memoryview(Path(onnx_path).read_bytes())
    out = []
    for field, a, b in _fields(buf, 0, len(buf)):
        if field != 7:  # ModelProto.graph
            continue
        for gfield, ta, tb in _fields(buf, a, b):
            if gfield not in (5, 15):  # GraphProto.initializer, sparse_initializer
                continue
            for tfield, ea, eb in _fields(buf, ta, tb):
                if tfield != 13:  # TensorProto.external_data (StringStringEntryProto)
                    continue
                entry = {k: bytes(buf[x:y]).decode("utf-8", "replace") for k, x, y in _fields(buf, ea, eb)}
                if entry.get(1) == "location" and 2 in entry:
                    out.append(entry[2])
    return out


def check_onnx_external_data(bundle: Path, model_rel: str, manifest: dict) -> None:
    model = bundle / model_rel
    for loc in set(external_data_locations(model)):
        rel = (PurePosixPath(model_rel).parent / loc).as_posix()
        if PurePosixPath(loc).is_absolute() or ".." in PurePosixPath(loc).parts:
            raise UnsafeBundle(f"{model}: external data location {loc!r} points outside the bundle; refusing to load it")
        check_relative(bundle, rel, f"{model_rel} external data")
        if rel not in manifest.get("files", {}):
            raise UnsafeBundle(f"{model}: external data {loc!r} is not listed in the manifest; the bundle was modified")
