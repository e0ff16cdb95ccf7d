"""Calibration and held-out evaluation sets, one per graph, made of exactly what each graph sees.

* ``vae_encoder``: real photos at the bundle's resolution (random crops of ``--data``, default
  ``data/photos/calibration``; held-out: centre crops of ``--eval-data``, default ``data/photos/eval``,
  falling back to the photos packaged with dcae_edge);
* ``vae_decoder``: the latents of those photos made by the bundle's *fp32* encoder (what the
  decoder decodes; Gaussian noise would calibrate the wrong ranges);
* ``transformer``: (noisy latent, timestep, class) inputs recorded along real sampling trajectories
  driven by the bundle's fp32 transformer with ``dcae_edge.schedules`` (numpy only), over the whole
  timestep range and batched as exported: classifier-free guidance batch 2N = N conditional + N
  null-class rows (onnxruntime #19183: feeds that disagree with the exported batch break INT8 graphs).

``--data`` may also be a ``.npz`` file holding ``<graph>.<input>`` arrays (N x input shape): such
arrays replace the corresponding generated set. Every set is checked against the graph's input
signature (names, dtypes, static dims at the bundle resolution, finite values) before anything is
quantized. Sets are cached on disk (``--cache-dir``, outside the bundle so a failed run leaves it
untouched), keyed by the fp32 model and data they come from; their content hash goes into the
manifest.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from dcae_edge import schedules
from export.common import export_sizes
from export.specs import TensorSpec

from . import CalibrationError

Runner = Callable[[dict], list]  # feeds -> outputs (numpy), in the graph's output order
GRAPH_ORDER = ("vae_encoder", "vae_decoder", "transformer")
DEFAULT_DATA = Path("data/photos/calibration")
DEFAULT_EVAL = Path("data/photos/eval")
PHOTOS_HINT = "build the photo set with `python -m dcae_edge.photos --out data/photos`, or pass --data DIR"


def photos_hint(held_out: bool) -> str:
    return PHOTOS_HINT.replace("--data", "--eval-data") if held_out else PHOTOS_HINT
EVAL_SEED_OFFSET = 10_000  # held-out trajectories never share a seed with calibration ones


@dataclass
class SetOptions:
    data: Path | None = None          # photo folder or .npz of <graph>.<input> arrays
    eval_data: Path | None = None
    num_samples: int = 32             # calibration feeds per graph (transformer: whole trajectories, >= this)
    num_eval: int = 8                 # held-out photos / trajectories' worth of feeds
    steps: int = 10                   # sampling steps per recorded trajectory
    cfg_scale: float = 3.0
    seed: int = 0
    cache_dir: Path | None = None


@dataclass
class FeedSet:
    """Feeds of one graph (each a dict batched as exported) and, for photo-based held-out sets,
    the original photos (N x 3 x H x W in [-1, 1]) to measure reconstructions against."""
    graph: str
    kind: str                         # "calibration" | "evaluation"
    feeds: list[dict]
    source: str
    photos: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    cached: bool = False              # loaded from the cache (progress output only)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for f in self.feeds:
            for name in sorted(f):
                a = np.ascontiguousarray(f[name])
                h.update(f"{name}{a.dtype}{a.shape}".encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def to_manifest(self) -> dict:
        return {"hash": "sha256:" + self.content_hash()[:32], "size": len(self.feeds), "source": self.source, **self.meta}


# ----------------------------------------------------------------------------- the graph's signature
def graph_sizes(manifest: dict, graph: str) -> dict[str, int]:
    """Sizes of the symbolic axes at the bundle resolution (the exporters' own rule)."""
    f = manifest["autoencoder"]["spatial_compression"]
    spec = SimpleNamespace(name=graph, spatial_scale=f if graph == "vae_decoder" else 1)
    return export_sizes(spec, manifest["resolution"])


def signature(manifest: dict, graph: str) -> list[TensorSpec]:
    return [TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in manifest["graphs"][graph]["inputs"]]


def check_feeds(fs: FeedSet, manifest: dict) -> None:
    """Names, dtypes, static dims and finiteness of every feed; the first problem is an error."""
    graph, what = fs.graph, f"{fs.kind} set for {fs.graph} ({fs.source})"
    if not fs.feeds:
        raise CalibrationError(f"{what} is empty")
    specs = signature(manifest, graph)
    sizes = graph_sizes(manifest, graph)
    dynamic = manifest.get("dynamic", False)
    for i, feeds in enumerate(fs.feeds):
        if set(feeds) != {t.name for t in specs}:
            raise CalibrationError(f"{what}: feed {i} has inputs {sorted(feeds)}, the graph takes {[t.name for t in specs]}")
        for t in specs:
            a = feeds[t.name]
            want = list(t.shape_for(sizes))
            free = {0} if dynamic and t.dims and t.dims[0] == "batch" else set()  # dynamic graphs: any batch
            if a.dtype != np.dtype(t.dtype):
                raise CalibrationError(f"{what}: feed {i} input {t.name!r} is {a.dtype}, the graph takes {t.dtype}")
            if a.ndim != len(want) or any(g != w for k, (g, w) in enumerate(zip(a.shape, want)) if k not in free):
                raise CalibrationError(
                    f"{what}: feed {i} input {t.name!r} has shape {list(a.shape)}, the graph takes {want} "
                    f"(bundle resolution {manifest['resolution']}px; channels, resolution and batch must match the export)")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise CalibrationError(f"{what}: feed {i} input {t.name!r} holds {int((~np.isfinite(a)).sum())} NaN/Inf values")


# ----------------------------------------------------------------------------- photos
def load_photos(folder: Path | None, size: int, n: int, seed: int, held_out: bool) -> tuple[np.ndarray, str]:
    """Calibration: ``n`` seeded random crops; held-out: centre crops of the first ``n`` photos."""
    import torch

    from dcae_edge.data import ImageFolder, sample_photos, to_model_range

    default = DEFAULT_EVAL if held_out else DEFAULT_DATA
    root = Path(folder) if folder else default
    if held_out and folder is None and not root.is_dir():
        print(f"  held-out photos: {root} not found, using the {n} photos packaged with dcae_edge")
        return sample_photos(size, n).numpy(), "dcae_edge sample photos"
    if folder is None and not root.is_dir():  # out of the box: crops of the packaged photos, said loudly
        import warnings

        root = Path(__file__).resolve().parents[1] / "dcae_edge" / "assets"
        warnings.warn(f"no calibration photos at {DEFAULT_DATA}: calibrating on crops of the 4 photos packaged with "
                      "dcae_edge, a small set; build data/photos (python -m dcae_edge.photos) or pass --data for better "
                      "INT8", stacklevel=2)
        print(f"  calibration photos: {DEFAULT_DATA} not found, using crops of the 4 packaged photos (a small set)")
    if not root.is_dir():
        raise CalibrationError(f"photo folder {root} does not exist; {photos_hint(held_out)}")
    try:
        imgs = ImageFolder(root, min_side=64, max_side=max(768, size))
    except ValueError as e:
        raise CalibrationError(f"{e}; {photos_hint(held_out)}") from None
    if held_out:
        crops = imgs.eval_crops(size, limit=n)
    else:
        crops, _ = imgs.random_crops(n, size, torch.Generator().manual_seed(seed))
    return to_model_range(crops).numpy(), f"{root} ({len(imgs)} photos, fingerprint {imgs.fingerprint()})"


def batched(name: str, arrays: np.ndarray, batch: int) -> list[dict]:
    """One feed per ``batch`` rows (the exported batch size)."""
    return [{name: np.ascontiguousarray(arrays[i:i + batch], dtype=np.float32)}
            for i in range(0, len(arrays) - batch + 1, batch)]


# ----------------------------------------------------------------------------- denoiser trajectories
def trajectory_feeds(run: Runner, manifest: dict, batch: int, count: int, steps: int, cfg_scale: float,
                     seed: int) -> list[dict]:
    """Inputs the fp32 transformer receives while sampling with the bundle's own recipe: whole
    trajectories (every model call from pure noise to the end) until at least ``count`` feeds,
    one seed and class set per trajectory."""
    den = manifest["denoiser"]
    cfg = den["config"]
    k = cfg["num_classes"]
    recipe = schedules.recipe_of_manifest(manifest)
    if recipe["solver"]["name"] == "dopri5":  # adaptive: fixed Heun steps visit the same states, countably
        recipe = schedules.with_solver(recipe, "heun")
    use_cfg = k > 0 and cfg_scale != 1.0
    n = batch // 2 if use_cfg else batch
    if use_cfg and batch % 2:
        raise CalibrationError(f"transformer exported with batch {batch}: classifier-free guidance needs an even batch")
    from tqdm import tqdm

    feeds: list[dict] = []
    for traj in tqdm(range(math.ceil(count / steps)), desc="  recording trajectories", leave=False, disable=None):
        sd = seed + traj
        labels = np.array([(sd * n + i) % k for i in range(n)], dtype=np.int64) if k > 0 else None
        schedules.generate_numpy(recipe, lambda feed: run(feed)[0], labels, n, steps, cfg_scale if k > 0 else 1.0, sd,
                                 record=feeds)
    return feeds


# ----------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dcae-edge" / "calibration"


def cached(cache_dir: Path | None, key: dict, build: Callable[[], FeedSet]) -> FeedSet:
    """Load the set stored under ``key`` or build and store it (atomically: write, then rename)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir / f"{key['graph']}-{key['kind']}-{digest}.npz"
    if path.is_file():
        try:
            return _load(path)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt, never trusted
            print(f"  cache {path.name} unreadable ({type(e).__name__}): rebuilding")
    fs = build()
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save(fs, path)
    except OSError as e:  # a read-only cache only costs time
        print(f"  calibration cache not written ({e})")
    return fs


def _save(fs: FeedSet, path: Path) -> None:
    names = sorted(fs.feeds[0]) if fs.feeds else []
    arrays = {f"in.{n}": np.stack([f[n] for f in fs.feeds]) for n in names}
    if fs.photos is not None:
        arrays["photos"] = fs.photos
    header = {"graph": fs.graph, "kind": fs.kind, "source": fs.source, "meta": fs.meta}
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, header=np.array(json.dumps(header)), **arrays)
    os.replace(tmp, path)


def _load(path: Path) -> FeedSet:
    with np.load(path, allow_pickle=False) as z:
        header = json.loads(str(z["header"]))
        names = [k[3:] for k in z.files if k.startswith("in.")]
        stacks = {n: z[f"in.{n}"] for n in names}
        photos = z["photos"] if "photos" in z.files else None
    count = len(next(iter(stacks.values()))) if stacks else 0
    feeds = [{n: stacks[n][i] for n in names} for i in range(count)]
    return FeedSet(header["graph"], header["kind"], feeds, header["source"], photos, header["meta"], cached=True)


# ----------------------------------------------------------------------------- user-supplied arrays
def file_sets(path: Path | None, manifest: dict, flag: str = "--data") -> dict[str, FeedSet]:
    """``--data file.npz``: ``<graph>.<input>`` arrays (N x input shape) -> calibration sets (``flag``:
    the option the file came from, for the messages)."""
    if path is None or Path(path).is_dir():
        return {}
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{flag} {path} does not exist" + (f"; {PHOTOS_HINT}" if flag == "--data" else ""))
    if path.suffix != ".npz":
        raise CalibrationError(f"{flag} {path}: expected " + ("a photo folder or " if flag == "--data" else "")
                               + "a .npz of <graph>.<input> arrays")
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        with np.load(path, allow_pickle=False) as z:
            for key in z.files:
                graph, _, name = key.partition(".")
                out.setdefault(graph, {})[name] = z[key]
    except (ValueError, zipfile.BadZipFile):  # a truncated or foreign file (numpy then guesses "pickled data")
        raise CalibrationError(f"{flag} {path} is not a readable .npz archive of arrays (truncated, or another format)") from None
    except OSError as e:
        raise CalibrationError(f"{flag} {path}: {e}") from None
    sets = {}
    for graph, arrays in out.items():
        if graph not in manifest["graphs"]:
            raise CalibrationError(f"{flag} {path}: arrays for {graph!r}, which this bundle does not have")
        scalars = [n for n, a in arrays.items() if np.ndim(a) == 0]
        if scalars:
            raise CalibrationError(f"{flag} {path}: {graph}.{scalars[0]} is a single value; expected N x the input's shape")
        count = min(len(a) for a in arrays.values()) if arrays else 0
        ranks = {t["name"]: len(t["shape"]) for t in manifest["graphs"][graph]["inputs"]}

        def feed(name, a, i):  # N x input shape, or N x (input shape without its batch axis): one row per feed
            x = np.asarray(a[i])
            return x[None] if x.ndim == ranks.get(name, x.ndim) - 1 else x

        sets[graph] = FeedSet(graph, "calibration", [{n: feed(n, a, i) for n, a in arrays.items()} for i in range(count)],
                              str(path))
    return sets


def photo_set(graph: str, manifest: dict, photos: np.ndarray, kind: str, source: str, run_encoder: Runner | None) -> FeedSet:
    """Encoder feeds are the photos; decoder feeds their fp32 latents (batched as exported)."""
    batch = graph_sizes(manifest, graph)["batch"]
    enc = batched("sample", photos, graph_sizes(manifest, "vae_encoder")["batch"])
    if graph == "vae_encoder":
        return FeedSet(graph, kind, enc, source, photos if kind == "evaluation" else None)
    check_feeds(FeedSet("vae_encoder", kind, enc, source), manifest)  # a bad photo set fails before the encoder runs
    from tqdm import tqdm

    latents = np.concatenate([run_encoder(f)[0] for f in tqdm(enc, desc=f"  fp32 latents ({kind})", leave=False, disable=None)])
    return FeedSet(graph, kind, batched("latent_sample", latents, batch), f"fp32 encoder latents of {source}",
                   photos if kind == "evaluation" else None)


# ----------------------------------------------------------------------------- all sets of a run
def folder_fingerprint(folder: Path) -> str:
    """Cheap identity of a photo folder (names, sizes, mtimes) for cache keys."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(folder)}{st.st_size}{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def build_sets(manifest: dict, graphs: list[str], opts: SetOptions, runner_for: Callable[[str], Runner],
               model_id: Callable[[str], str]) -> tuple[dict[str, FeedSet], dict[str, FeedSet]]:
    """(calibration sets, held-out sets) for ``graphs``, each checked against its graph's signature.

    ``runner_for(graph)`` gives the fp32 graph that produces derived inputs (encoder -> latents,
    transformer -> trajectories); ``model_id(graph)`` identifies it in cache keys."""
    res = manifest["resolution"]
    user = file_sets(opts.data, manifest)
    folder = {"calibration": opts.data if opts.data and Path(opts.data).is_dir() else None, "evaluation": opts.eval_data}
    count = {"calibration": opts.num_samples, "evaluation": opts.num_eval}

    def photos(kind: str) -> tuple[np.ndarray, str]:
        if kind == "calibration" and "vae_encoder" in user:
            check_feeds(user["vae_encoder"], manifest)
            return np.concatenate([f["sample"] for f in user["vae_encoder"].feeds]), user["vae_encoder"].source
        return load_photos(folder[kind], res, count[kind], opts.seed, held_out=kind == "evaluation")

    has_encoder = "vae_encoder" in manifest["graphs"]
    if "vae_decoder" in graphs and not has_encoder and "vae_decoder" not in user:
        raise CalibrationError("this bundle has no vae_encoder to turn photos into decoder inputs: pass the decoder's "
                               "inputs as --data latents.npz (an array 'vae_decoder.latent_sample', N x "
                               f"{manifest['graphs']['vae_decoder']['inputs'][0]['shape'][1]} x h x w; a quarter is held out "
                               "for the gate), or export the encoder too")
    if "vae_decoder" in graphs and not has_encoder:  # given latents: every 4th feed is held out for the gate
        given = user["vae_decoder"]
        held_feeds = given.feeds[3::4] or given.feeds[-1:]
        user["vae_decoder"] = FeedSet("vae_decoder", "calibration", [f for i, f in enumerate(given.feeds) if i % 4 != 3] or
                                      given.feeds, given.source)
        user["vae_decoder:held"] = FeedSet("vae_decoder", "evaluation", held_feeds, f"{given.source} (held-out quarter)")

    def key(graph: str, kind: str) -> dict:
        k = {"graph": graph, "kind": kind, "resolution": res, "n": count[kind], "seed": opts.seed, "version": 1}
        if graph == "transformer":
            k.update(model=model_id("transformer"), steps=opts.steps, cfg=opts.cfg_scale)
        else:
            root = folder[kind] or (DEFAULT_EVAL if kind == "evaluation" else DEFAULT_DATA)
            k.update(data=str(Path(root).resolve()), data_id=folder_fingerprint(root) if Path(root).is_dir() else "packaged",
                     user=str(opts.data) if "vae_encoder" in user else None)
            if graph == "vae_decoder" and has_encoder:
                k["encoder"] = model_id("vae_encoder")
        return k

    def build(graph: str, kind: str) -> FeedSet:
        if graph == "transformer":
            seed = opts.seed + (EVAL_SEED_OFFSET if kind == "evaluation" else 0)
            n = count[kind] if kind == "calibration" else max(2 * opts.steps, count[kind])
            feeds = trajectory_feeds(runner_for("transformer"), manifest, graph_sizes(manifest, graph)["batch"], n,
                                     opts.steps, opts.cfg_scale, seed)
            return FeedSet(graph, kind, feeds, f"fp32 sampling trajectories ({opts.steps} steps, cfg {opts.cfg_scale}, "
                           f"seeds from {seed})", meta={"steps": opts.steps, "cfg_scale": opts.cfg_scale})
        ph, source = photos(kind)
        return photo_set(graph, manifest, ph, kind, source, runner_for("vae_encoder") if graph == "vae_decoder" else None)

    out: tuple[dict, dict] = ({}, {})
    for graph in graphs:
        for kind, sets in zip(("calibration", "evaluation"), out):
            if kind == "calibration" and graph in user:
                sets[graph] = user[graph]
            elif kind == "evaluation" and f"{graph}:held" in user:
                sets[graph] = user[f"{graph}:held"]
            else:
                sets[graph] = cached(opts.cache_dir, key(graph, kind), lambda g=graph, k=kind: build(g, k))
            check_feeds(sets[graph], manifest)
    return out
