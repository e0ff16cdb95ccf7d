"""Train a latent diffusion transformer on DC-AE latents.

    python -m dcae_edge.train_denoiser --autoencoder f64 --data data/photos/train \
        --model dit-tiny --out runs/dit-f64 --steps 4000
    torchrun --nproc_per_node 2 -m dcae_edge.train_denoiser ...

The first run encodes the image folder once into a latent cache (``OUT/latents.safetensors``:
random crops and flips, latents x scaling_factor as the official pipeline stores them, with the
autoencoder's fingerprint); later runs reuse it and refuse a cache made by another autoencoder.
Class labels come from ImageFolder sub-folders, or the model is unconditional (``--unconditional``).
Writes ``ckpt.pt`` (atomic; rerun to resume), ``model.safetensors`` (EMA), ``loss.png``,
``samples.png``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from .checkpoints import (CheckpointError, atomic_save_safetensors, autoencoder_fingerprint, latent_fingerprint,
                          latents_match, load_autoencoder, read_safetensors)
from .data import ImageFolder, step_generator, to_model_range
from .denoiser import DENOISER_PRESETS, build_denoiser, save_denoiser
from .schedules import NUM_TRAIN_TIMESTEPS, ddpm_alphas_cumprod
from .training_utils import (EMA, atomic_torch_save, config_fingerprint, describe_mismatch, init_distributed,
                             broadcast_buffers, load_training_checkpoint, parse_dataclass_args, plot_curves, replicas_identical, resolve_amp, resolve_device, save_image_grid, unwrap)


@dataclass
class DenoiserTrainConfig:
    autoencoder: str = "f64"         # anything load_autoencoder takes
    data: str = "data/photos/train"
    out: str = "runs/dit-f64"
    cache: str = ""                  # default OUT/latents.safetensors
    resolution: int = 256
    crops_per_image: int = 64
    crop_min_scale: float = 0.5      # 1.0: whole images (e.g. rendered digits, which a crop could cut)
    no_flip: bool = False            # mirrored digits are not digits
    recipe_steps: int = 30           # sampling defaults stored with the model (its recipe)
    recipe_cfg: float = 1.0
    recipe_solver: str = ""          # "" = the prediction type's default (euler for flow)
    unconditional: bool = False
    model: str = "dit-tiny"          # preset (dit-tiny, uvit-tiny, uvit-s, ...)
    prediction: str = "flow"         # flow | eps
    time_sampling: str = "logit-normal"  # flow t: logit-normal (SD3) | uniform (trains the high-noise steps that decide layout)
    time_shift: float = 1.0          # flow t -> s*t / (1 + (s-1)*t): s > 1 moves training toward noise (SD3 for large latents)
    flow_skip: bool = False          # flow: the model adds c(t) * x_t to its output (see denoiser.flow_skip_scale)
    label_every_token: bool = False  # U-ViT: the class embedding added to every patch token too (a stronger class signal)
    class_prior: bool = False        # with --flow-skip: a per-class mean latent (from the data) in the output, see denoiser.class_prior_scale
    init_from: str = ""              # start from these weights (a ckpt.pt or model.safetensors), fresh optimizer
    class_means_from_data: bool = False  # with --init-from: class means from this run's latents, not the init's
                                     # (the init was trained on another autoencoder's latent space)
    hidden_size: int = 0             # 0 = preset
    depth: int = 0
    batch_size: int = 64
    steps: int = 2000
    time_budget: float = 0.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 200
    ema_decay: float = 0.999
    amp: str = "auto"
    ckpt_every: int = 500
    log_every: int = 20
    seed: int = 0
    device: str = "auto"


def build_cache(cfg: DenoiserTrainConfig, path: Path, device) -> dict:
    try:
        ae = load_autoencoder(cfg.autoencoder, device=device)
    except CheckpointError as e:
        raise ConfigError(f"--autoencoder: {e}") from None
    try:
        data = ImageFolder(cfg.data, min_side=min(cfg.resolution, 256)).to(device)
    except (FileNotFoundError, ValueError) as e:  # no folder, or no usable image in it
        raise ConfigError(f"--data: {e}") from None
    n = len(data) * cfg.crops_per_image
    latents, labels = [], []
    amp = resolve_amp(cfg.amp, device)  # the training precision encodes too: a generator's data, not a reference
    for i in tqdm(range(0, n, 32), desc="encoding latent cache"):
        crops, lab = data.random_crops(min(32, n - i), cfg.resolution, step_generator(cfg.seed + 17, i),
                                       min_scale=cfg.crop_min_scale, flip=not cfg.no_flip)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            latents.append(ae.encode(to_model_range(crops)).float().cpu() * ae.scaling_factor)
        labels.append(lab)
    meta = {"format": "dcae-edge", "kind": "latent-cache", "autoencoder_source": cfg.autoencoder,
            "autoencoder_fingerprint": autoencoder_fingerprint(ae), "latent_fingerprint": latent_fingerprint(ae),
            "scaling_factor": str(ae.scaling_factor), "encoded_in": str(amp or torch.float32).replace("torch.", ""),
            "resolution": str(cfg.resolution), "class_names": json.dumps(data.classes), "data": cfg.data}
    atomic_save_safetensors({"latents": torch.cat(latents), "labels": torch.cat(labels)}, path, meta)
    return meta


def load_cache(path: Path, ae_source: str, device) -> tuple[torch.Tensor, torch.Tensor, dict]:
    tensors, meta = read_safetensors(path)
    if meta.get("kind") != "latent-cache":
        raise ValueError(f"{path} is not a latent cache")
    ae = load_autoencoder(ae_source, device=device)
    if not latents_match(ae, meta):
        raise ValueError(f"{path} was encoded with another autoencoder ({meta['autoencoder_source']}, fingerprint "
                         f"{meta['autoencoder_fingerprint']}) than --autoencoder {ae_source}; delete the cache or "
                         "point --cache elsewhere to rebuild it")
    return tensors["latents"], tensors["labels"], meta


def sample_flow_time(cfg: DenoiserTrainConfig, g: torch.Generator) -> torch.Tensor:
    """Training times for flow matching, t = 1 is pure noise. Logit-normal rarely draws t > 0.9 (1.4%),
    where a sampler's first steps decide what the image shows; uniform or a shift > 1 trains them."""
    if cfg.time_sampling == "logit-normal":
        t = torch.sigmoid(torch.randn(cfg.batch_size, generator=g))
    elif cfg.time_sampling == "uniform":
        t = torch.rand(cfg.batch_size, generator=g)
    else:
        raise ValueError(f"--time-sampling {cfg.time_sampling!r}: expected logit-normal or uniform")
    return cfg.time_shift * t / (1 + (cfg.time_shift - 1) * t)


def init_class_means(model: nn.Module, latents: torch.Tensor, labels: torch.Tensor) -> None:
    """--class-prior starts from the data: each class's mean latent, and the mean of all for the null class."""
    with torch.no_grad():
        means = model.class_means
        for k in range(means.shape[0] - 1):
            if (labels == k).any():
                means[k] = latents[labels == k].float().mean(0)
        means[-1] = latents.float().mean(0)


def init_weights(model: nn.Module, ema, path: str) -> None:
    """Warm start: model and EMA from a training checkpoint's EMA or a model.safetensors (same architecture)."""
    p = Path(path)  # its existence is checked with the rest of the configuration (check_config)
    if p.suffix == ".pt":
        state = load_training_checkpoint(p)["ema"]
    else:
        state, _ = read_safetensors(p)
    missing, unexpected = unwrap(model).load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "class_means"]  # a run without --class-prior: the data's means stay
    if missing or unexpected:
        raise ValueError(f"--init-from {path}: another architecture (missing {missing[:4]}, unexpected {unexpected[:4]})")
    ema.model.load_state_dict(unwrap(model).state_dict())


class ConfigError(ValueError):
    """A mistake in the training configuration, said before any training step."""


def check_config(cfg: DenoiserTrainConfig) -> None:
    if cfg.model not in DENOISER_PRESETS:
        raise ConfigError(f"--model {cfg.model!r}: known presets {', '.join(DENOISER_PRESETS)}")
    if cfg.time_sampling not in ("logit-normal", "uniform"):
        raise ConfigError(f"--time-sampling {cfg.time_sampling!r}: expected logit-normal or uniform")
    if cfg.time_shift <= 0:
        raise ConfigError(f"--time-shift must be > 0, got {cfg.time_shift}")
    if cfg.init_from and not Path(cfg.init_from).is_file():
        raise ConfigError(f"--init-from {cfg.init_from}: no such file")
    if cfg.class_means_from_data and not (cfg.class_prior and cfg.init_from):
        raise ConfigError("--class-means-from-data re-estimates a warm start's class means: it needs --class-prior and --init-from")
    if cfg.class_prior and (not cfg.flow_skip or cfg.unconditional or cfg.prediction != "flow"):
        raise ConfigError("--class-prior needs --flow-skip (flow prediction) and class labels")
    if cfg.label_every_token and ("uvit" not in cfg.model or cfg.unconditional):
        raise ConfigError(f"--label-every-token is for a class-conditional U-ViT (--model uvit-...), got --model {cfg.model}"
                          + (" --unconditional" if cfg.unconditional else ""))


def denoiser_overrides(run: dict, channels: int, size: int, num_classes: int) -> dict:
    """build_denoiser's arguments for a run's configuration (a DenoiserTrainConfig as a dict, e.g. a
    checkpoint's run_key) on latents of ``channels`` x ``size`` x ``size``."""
    overrides = dict(input_size=size, in_channels=channels, num_classes=num_classes, prediction=run["prediction"])
    if run.get("hidden_size"):
        overrides["hidden_size"] = run["hidden_size"]
    if run.get("depth"):
        overrides["depth"] = run["depth"]
    for flag in ("flow_skip", "label_every_token", "class_prior"):
        if run.get(flag):
            overrides[flag] = True
    return overrides


def train(cfg: DenoiserTrainConfig) -> dict:
    check_config(cfg)
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    amp = resolve_amp(cfg.amp, device)
    out = Path(cfg.out)
    cache_path = Path(cfg.cache or out / "latents.safetensors")
    if dist_info.main and not cache_path.is_file():
        build_cache(cfg, cache_path, device)
    if dist_info.world > 1:
        torch.distributed.barrier()
    latents, labels, meta = load_cache(cache_path, cfg.autoencoder, device)
    class_names = json.loads(meta["class_names"])
    num_classes = 0 if cfg.unconditional else len(class_names)
    c, h, w = latents.shape[1:]
    overrides = denoiser_overrides(dataclasses.asdict(cfg), c, h, num_classes)
    torch.manual_seed(cfg.seed)
    model = build_denoiser(cfg.model, **overrides).to(device).train()
    if cfg.class_prior:
        init_class_means(model, latents, labels)
    ema = EMA(model, cfg.ema_decay)
    if dist_info.world > 1:
        model = nn.parallel.DistributedDataParallel(model, **(dict(device_ids=[device.index]) if device.type == "cuda" else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    acp = torch.tensor(ddpm_alphas_cumprod(), dtype=torch.float32)

    run_key = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("steps", "time_budget", "ckpt_every", "log_every", "device", "out", "cache", "recipe_steps",
                            "recipe_cfg", "recipe_solver")}
    run_key["world"] = dist_info.world
    ckpt_path = out / "ckpt.pt"
    step, history = 0, []
    if cfg.init_from and not ckpt_path.is_file():
        init_weights(model, ema, cfg.init_from)
        if cfg.class_means_from_data:
            init_class_means(unwrap(model), latents, labels)
            ema.model.load_state_dict(unwrap(model).state_dict())
    if ckpt_path.is_file():
        ck = load_training_checkpoint(ckpt_path)
        saved = json.loads(ck["run_key"])
        defaults = dataclasses.asdict(DenoiserTrainConfig())
        saved = {**{k: v for k, v in run_key.items() if k not in saved and v == defaults.get(k)}, **saved}  # options added later
        if config_fingerprint(saved) != config_fingerprint(run_key):
            raise ValueError(f"{ckpt_path} belongs to another configuration ({describe_mismatch(saved, run_key)}); "
                             "use another --out or delete the checkpoint")
        unwrap(model).load_state_dict(ck["model"])
        ema.model.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        step, history = ck["step"], json.loads(ck["history"])

    def save_ckpt():
        if dist_info.main:
            atomic_torch_save({"model": unwrap(model).state_dict(), "ema": ema.model.state_dict(), "opt": opt.state_dict(),
                               "step": step, "history": json.dumps(history), "run_key": json.dumps(run_key)}, ckpt_path)

    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="denoiser", disable=not dist_info.main, dynamic_ncols=True)
    while step < cfg.steps and not (cfg.time_budget and time.time() - t0 > cfg.time_budget):
        g = step_generator(cfg.seed, step, dist_info.rank)
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=g)
        x0 = latents[idx].to(device)
        y = labels[idx].to(device) if num_classes else None
        if num_classes:  # class dropout -> learned null class for CFG
            drop = torch.rand(cfg.batch_size, generator=g) < unwrap(model).config.class_dropout_prob
            y = torch.where(drop.to(device), torch.full_like(y, num_classes), y)
        noise = torch.randn(x0.shape, generator=g).to(device)
        if cfg.prediction == "flow":
            t = sample_flow_time(cfg, g).to(device)
            xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
            target, timestep = noise - x0, t * NUM_TRAIN_TIMESTEPS
        else:
            ti = torch.randint(NUM_TRAIN_TIMESTEPS, (cfg.batch_size,), generator=g)
            a = acp[ti].to(device)[:, None, None, None]
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target, timestep = noise, ti.float().to(device)
        for grp in opt.param_groups:
            grp["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = model(xt, timestep, y)[:, :c].float()
        loss = (pred - target).pow(2).mean()
        if not torch.isfinite(loss):
            save_ckpt()
            raise FloatingPointError(f"non-finite loss at step {step}; last good checkpoint kept at {ckpt_path}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        if step % cfg.log_every == 0 or step == 1:
            history.append({"step": step, "loss": loss.item()})
            bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if step % cfg.ckpt_every == 0:
            save_ckpt()
    bar.close()
    save_ckpt()
    broadcast_buffers(model)
    identical = replicas_identical(model) if dist_info.world > 1 else None
    summary = {}
    if dist_info.main:
        summary = finish(cfg, ema.model, meta, history, step, class_names, device, time.time() - t0)
    if dist_info.world > 1:
        summary["replicas_identical"] = identical
        if dist_info.main:
            (Path(cfg.out) / (f"phase{cfg.phase}" if hasattr(cfg, "phase") else "") / "ddp.json").write_text(
                json.dumps({"world": dist_info.world, "replicas_identical": identical}))
        torch.distributed.barrier()
        if not identical:
            raise RuntimeError("DDP replicas diverged: parameters differ between ranks")
    return summary


@torch.no_grad()
def finish(cfg, model, meta, history, step, class_names, device, seconds) -> dict:
    from .sample import generate_latents

    out = Path(cfg.out)
    model.eval()
    summary = {"model": model.config.name, "arch": model.config.arch, "prediction": model.config.prediction,
               "parameters": sum(p.numel() for p in model.parameters()), "steps": step, "target_steps": cfg.steps,
               "batch_size": cfg.batch_size, "lr": cfg.lr, "classes": class_names if model.config.conditional else [],
               "final_loss": history[-1]["loss"] if history else None, "seconds": round(seconds, 1), "device": str(device)}
    from .schedules import recipe_ours, with_solver

    recipe = with_solver(recipe_ours(model.config.prediction, cfg.recipe_steps, cfg.recipe_cfg), cfg.recipe_solver or None)
    extra = {"training": summary, "autoencoder_source": meta["autoencoder_source"], "recipe": recipe,
             "autoencoder_fingerprint": meta["autoencoder_fingerprint"],
             "latent_fingerprint": meta.get("latent_fingerprint") or latent_fingerprint(load_autoencoder(cfg.autoencoder)),
             "latent_scaling_factor": meta["scaling_factor"],
             "resolution": meta["resolution"], "class_names": class_names}
    save_denoiser(model, out / "model.safetensors", extra=extra)
    plot_curves(history, out / "loss.png", f"{model.config.name} ({model.config.prediction}) on {meta['autoencoder_source']}")
    ae = load_autoencoder(cfg.autoencoder, device=device)
    classes = list(range(model.config.num_classes)) * 2 if model.config.conditional else None
    rows = []
    for scale in ((1.0, 4.0) if model.config.conditional else (1.0,)):
        z = generate_latents(model, classes, steps=30, cfg_scale=scale, seed=0, n=8)
        rows.append(ae.decode(z / float(meta["scaling_factor"])).clamp(-1, 1).cpu())
    save_image_grid(rows, out / "samples.png", [f"cfg {s}" for s in ((1.0, 4.0) if model.config.conditional else (1.0,))])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


def parse_args(argv=None) -> DenoiserTrainConfig:
    return parse_dataclass_args(DenoiserTrainConfig, __doc__, argv)


def main(argv=None):
    try:
        train(parse_args(argv))
    except ConfigError as e:  # raised before any training step (check_config, or the cache's data and autoencoder)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
