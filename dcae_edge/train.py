"""Train a DC-AE the paper's way: decoupled high-resolution adaptation in three phases.

    phase 1  low resolution, whole model,               L1 + perceptual
    phase 2  high resolution, latent-interface layers,  L1 + perceptual
    phase 3  low resolution, decoder head,              L1 + perceptual + PatchGAN (hinge)

    python -m dcae_edge.train --model dc-ae-edge-f64c128 --phase 1 --out runs/f64 --steps 3000
    python -m dcae_edge.train --model dc-ae-edge-f64c128 --phase 2 --out runs/f64 --steps 500
    python -m dcae_edge.train --model dc-ae-edge-f64c128 --phase 3 --out runs/f64 --steps 500
    torchrun --nproc_per_node 2 -m dcae_edge.train ...      # DDP (gloo on CPU, NCCL on CUDA)

Each phase writes ``OUT/phase{N}/``: ``ckpt.pt`` (atomic, every --ckpt-every steps; rerunning the
same command resumes from it), ``model.safetensors`` (EMA weights, our format), ``loss.png``,
``recon.png`` and ``summary.json``. Phases 2 and 3 start from the previous phase's model.

Perceptual term: LPIPS-VGG when the ``lpips`` package and its weights are already on disk (nothing
is downloaded), otherwise 1 - MS-SSIM. Which one ran is recorded in the summary and checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .autoencoder import DCAE
from .checkpoints import _load_ours, build_autoencoder, save_autoencoder
from .data import ImageFolder, step_generator, to_model_range
from .metrics import ms_ssim, psnr, try_lpips
from .presets import get_config
from .training_utils import (EMA, atomic_torch_save, config_fingerprint, describe_mismatch, init_distributed,
                             broadcast_buffers, load_training_checkpoint, parse_dataclass_args, plot_curves, replicas_identical, resolve_amp, resolve_device, save_image_grid, unwrap)

# Paper, appendix A: AdamW per phase.
PHASE_DEFAULTS = {
    1: dict(lr=6.4e-5, weight_decay=0.1, betas=(0.9, 0.999), resolution=256),
    2: dict(lr=1.6e-5, weight_decay=0.001, betas=(0.9, 0.999), resolution=512),
    3: dict(lr=5.4e-5, weight_decay=0.001, betas=(0.5, 0.9), resolution=256),
}


@dataclass
class TrainConfig:
    model: str = "dc-ae-edge-f64c128"  # preset name, or a JSON file holding a DCAEConfig
    plain: bool = False                # ablation: remove every residual shortcut
    data: str = "data/photos/train"
    eval_data: str = "data/photos/eval"
    out: str = "runs/f64"
    phase: int = 1
    init: str = ""                     # weights to start from; phases 2/3 default to OUT/phase{N-1}/model.safetensors
    resolution: int = 0                # 0 = phase default (256 / 512 / 256)
    batch_size: int = 16               # per process
    steps: int = 1000
    time_budget: float = 0.0           # seconds, 0 = unlimited; stops early (checkpointed, resumable)
    lr: float = 0.0                    # 0 = phase default (paper)
    weight_decay: float = -1.0         # <0 = phase default
    warmup: int = 100
    lr_schedule: str = "constant"      # constant | cosine (anneal to 10% at --steps)
    perceptual: str = "auto"           # auto | lpips | ms-ssim | none
    perceptual_weight: float = 0.25
    pixel_loss: str = "l1"             # l1 (paper) | mse (optimises PSNR directly)
    gan_weight: float = 0.1            # phase 3 only; 0 = no discriminator at all
    disc_lr: float = 2e-4
    middle_stages: int = 1             # phase 2: deepest N stages + latent interface
    head_stages: int = 1               # phase 3: shallowest N decoder stages + output head
    ema_decay: float = 0.999
    amp: str = "auto"                  # auto | bf16 | fp32
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    max_side: int = 768
    balance: bool = False              # sample sub-folders (photo collections) by 1/sqrt(size), not uniformly

    def phase_value(self, key: str):
        v = getattr(self, key)
        default = PHASE_DEFAULTS[self.phase][key]
        if key == "resolution":
            return v or default
        if key == "lr":
            return v or default
        if key == "weight_decay":
            return v if v >= 0 else default
        return default


# ---------------------------------------------------------------------------------------------- which layers train
class SetupError(ValueError):
    """A run that cannot start as asked (data, --init, a checkpoint of another configuration): raised
    before the first step, so the CLI reports it in one line."""


def trainable_prefixes(model: DCAE, phase: int, middle_stages: int = 1, head_stages: int = 1) -> list[str]:
    """Module-name prefixes trained in each phase."""
    enc_stages = [i for i, d in enumerate(model.config.encoder_layers_per_block) if d > 0]
    dec_stages = [i for i, d in enumerate(model.config.decoder_layers_per_block) if d > 0]
    if phase == 1:
        return [""]
    if phase == 2:  # latent interface: encoder head + decoder input and the deepest stages around the latent
        if middle_stages > len(enc_stages) or middle_stages > len(dec_stages):
            raise SetupError(f"--middle-stages {middle_stages} exceeds the model's {len(enc_stages)} stages")
        return (["encoder.conv_out."] + [f"encoder.down_blocks.{i}." for i in enc_stages[len(enc_stages) - middle_stages:]]
                + ["decoder.conv_in."] + [f"decoder.up_blocks.{i}." for i in dec_stages[len(dec_stages) - middle_stages:]])
    if phase == 3:  # decoder head: output norm/conv and the shallowest stages
        if head_stages > len(dec_stages):
            raise SetupError(f"--head-stages {head_stages} exceeds the decoder's {len(dec_stages)} stages")
        head = ["decoder.norm_out.", "decoder.conv_out."] + [f"decoder.up_blocks.{i}." for i in dec_stages[:head_stages]]
        # a head that spans every stage is the whole decoder (latent space and encoder stay fixed)
        return head + (["decoder.conv_in."] if head_stages == len(dec_stages) else [])
    raise SetupError(f"phase must be 1, 2 or 3, got {phase}")


def load_arch(name: str):
    """A preset name or a JSON file with a DCAEConfig (custom architectures)."""
    from .autoencoder import DCAEConfig

    if name.endswith(".json") and Path(name).is_file():
        return DCAEConfig.from_dict(json.loads(Path(name).read_text()))
    try:
        return get_config(name)
    except KeyError as e:  # a typo, or a .json path that does not exist
        raise SetupError(f"--model {name}: " + ("no such file" if name.endswith(".json") else e.args[0])) from None


def set_trainable(model: DCAE, prefixes: list[str]) -> list[str]:
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(any(n.startswith(pre) for pre in prefixes))
        if p.requires_grad:
            names.append(n)
    if not names:
        raise SetupError(f"no parameter matches the trainable prefixes {prefixes}")
    return names


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose affine parameters are frozen also keep their running statistics."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.requires_grad:
            m.eval()


# ---------------------------------------------------------------------------------------------- losses
class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, 3 layers): a real/fake logit per 70x70 receptive field."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2**i, 8)
            seq += [nn.Conv2d(c, c_next, 4, 2 if i < layers else 1, 1, bias=False), nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        seq += [nn.Conv2d(c, 1, 4, 1, 1)]
        self.net = nn.Sequential(*seq)

    def forward(self, x):
        return self.net(x)


class ReconstructionLoss(nn.Module):
    def __init__(self, kind: str, weight: float, device, pixel: str = "l1"):
        super().__init__()
        if pixel not in ("l1", "mse"):
            raise SetupError(f"--pixel-loss must be l1 or mse, got {pixel!r}")
        self.pixel = pixel
        self.weight = weight
        self.lpips = None
        if kind in ("auto", "lpips"):
            self.lpips = try_lpips(device)
            if self.lpips is None and kind == "lpips":
                raise RuntimeError("--perceptual lpips: the lpips package or its VGG weights are not available offline; "
                                   "install lpips and place vgg16 weights in the torch hub cache, or use --perceptual ms-ssim")
        self.kind = "lpips" if self.lpips is not None else ("none" if kind == "none" else "ms-ssim")

    def forward(self, recon, target):
        diff = recon - target
        pix = diff.abs().mean() if self.pixel == "l1" else diff.pow(2).mean()
        if self.kind == "lpips":
            perc = self.lpips(recon.float(), target.float()).mean()
        elif self.kind == "ms-ssim":
            perc = 1 - ms_ssim(recon.float().clamp(-1, 1), target.float()).mean()
        else:
            perc = torch.zeros((), device=recon.device)
        return pix + self.weight * perc, {self.pixel: pix.item(), self.kind.replace("-", "_"): perc.item()}


# ---------------------------------------------------------------------------------------------- train
def lr_at(step: int, base_lr: float, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine annealing to 10% of the base rate at --steps."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "cosine":
        frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return base_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
    if cfg.lr_schedule != "constant":
        raise SetupError(f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    return base_lr


def train(cfg: TrainConfig) -> dict:
    if cfg.lr_schedule not in ("constant", "cosine"):  # else it would first fail after the warmup steps
        raise SetupError(f"--lr-schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    device = resolve_device(cfg.device)
    dist_info = init_distributed(device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", dist_info.local_rank)
    amp = resolve_amp(cfg.amp, device)
    phase_dir = Path(cfg.out) / f"phase{cfg.phase}"
    res = cfg.phase_value("resolution")

    # model: fresh (phase 1) or from the previous phase / --init
    init = cfg.init or ("" if cfg.phase == 1 else str(Path(cfg.out) / f"phase{cfg.phase - 1}" / "model.safetensors"))
    if init:
        if not Path(init).is_file():
            raise SetupError(f"phase {cfg.phase} starts from {init}, which does not exist: run phase "
                                    f"{cfg.phase - 1} first with the same --out, or pass --init")
        model = _load_ours(Path(init))
        if model.config.name != load_arch(cfg.model).name or model.config.residual_autoencoding == cfg.plain:
            raise SetupError(f"{init} holds {model.config.name} (residual={model.config.residual_autoencoding}); "
                             f"this run asks for {cfg.model} (plain={cfg.plain})")
    else:
        torch.manual_seed(cfg.seed)
        arch = load_arch(cfg.model)
        arch.residual_autoencoding = not cfg.plain
        model = build_autoencoder(arch)
    model.to(device).train()
    trainable = set_trainable(model, trainable_prefixes(model, cfg.phase, cfg.middle_stages, cfg.head_stages))
    rec_loss = ReconstructionLoss(cfg.perceptual, cfg.perceptual_weight, device, cfg.pixel_loss)
    disc = PatchDiscriminator().to(device) if cfg.phase == 3 and cfg.gan_weight > 0 else None

    if dist_info.world > 1:
        if device.type == "cuda":  # SyncBatchNorm needs CUDA; on CPU DDP broadcasts rank 0's buffers instead
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            disc = nn.SyncBatchNorm.convert_sync_batchnorm(disc) if disc is not None else None
        ddp_kw = dict(device_ids=[device.index]) if device.type == "cuda" else {}
        model = nn.parallel.DistributedDataParallel(model, **ddp_kw)
        disc = nn.parallel.DistributedDataParallel(disc, **ddp_kw) if disc is not None else None
    freeze_frozen_batchnorm(unwrap(model))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.phase_value("lr"), weight_decay=cfg.phase_value("weight_decay"),
                            betas=PHASE_DEFAULTS[cfg.phase]["betas"])
    disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)) if disc is not None else None
    ema = EMA(model, cfg.ema_decay)
    try:
        data = ImageFolder(cfg.data, min_side=min(res, 256), max_side=max(cfg.max_side, res)).to(device)
    except (FileNotFoundError, ValueError) as e:  # no folder, or no usable image in it
        raise SetupError(f"--data: {e}") from None

    # resume
    run_key = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k not in ("steps", "time_budget", "ckpt_every", "log_every", "device", "eval_data", "out")}
    run_key["world"] = dist_info.world
    step, history = 0, []
    ckpt_path = phase_dir / "ckpt.pt"
    if ckpt_path.is_file():
        ck = load_training_checkpoint(ckpt_path)
        saved_key = json.loads(ck["run_key"])
        if config_fingerprint(saved_key) != config_fingerprint(run_key):
            raise SetupError(f"{ckpt_path} belongs to another configuration ({describe_mismatch(saved_key, run_key)}); "
                             "use another --out, or delete the checkpoint to start this phase over")
        unwrap(model).load_state_dict(ck["model"])
        ema.model.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["opt"])
        if disc is not None:
            unwrap(disc).load_state_dict(ck["disc"])
            disc_opt.load_state_dict(ck["disc_opt"])
        step, history = ck["step"], json.loads(ck["history"])
        if dist_info.main:
            print(f"resumed {ckpt_path} at step {step}")

    def save_ckpt():
        broadcast_buffers(model)  # collective: every rank calls it
        if not dist_info.main:
            return
        state = {"model": unwrap(model).state_dict(), "ema": ema.model.state_dict(), "opt": opt.state_dict(),
                 "step": step, "history": json.dumps(history), "run_key": json.dumps(run_key)}
        if disc is not None:
            state.update(disc=unwrap(disc).state_dict(), disc_opt=disc_opt.state_dict())
        atomic_torch_save(state, ckpt_path)

    base_lr = cfg.phase_value("lr")
    skipped = 0
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"phase {cfg.phase} @{res}", disable=not dist_info.main,
               dynamic_ncols=True)
    while step < cfg.steps:
        if cfg.time_budget and time.time() - t0 > cfg.time_budget:
            break
        crops, _ = data.random_crops(cfg.batch_size, res, step_generator(cfg.seed, step, dist_info.rank), balance=cfg.balance)
        x = to_model_range(crops)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, base_lr, cfg)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            recon = model(x).float()
            g_loss = -disc(recon).float().mean() if disc is not None else None
        loss, logs = rec_loss(recon, x)  # fp32: SSIM variances are cancellation-prone
        if g_loss is not None:
            loss = loss + cfg.gan_weight * g_loss
            logs["g"] = g_loss.item()
        if not torch.isfinite(loss):
            save_ckpt()
            raise FloatingPointError(f"non-finite loss at step {step} ({logs}); last good checkpoint kept at {ckpt_path}. "
                                     "Lower --lr or use --amp fp32.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(grad_norm):
            opt.step()
        else:  # a rare overflow in the attention backward: skip the update, as AMP loss scaling does
            skipped += 1
        if disc is not None:  # hinge loss on real crops vs detached reconstructions
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                d_loss = (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean()).float()
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            disc_opt.step()
            logs["d"] = d_loss.item()
        ema.update(model)
        step += 1
        logs["loss"] = loss.item()
        logs["skipped"] = skipped
        if step % cfg.log_every == 0 or step == 1:
            history.append({"step": step, **logs})
            bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items()})
        bar.update(1)
        if step % cfg.ckpt_every == 0:
            save_ckpt()
    bar.close()
    save_ckpt()
    broadcast_buffers(model)
    identical = replicas_identical(model) if dist_info.world > 1 else None
    summary = {}
    if dist_info.main:
        summary = finish_phase(cfg, ema.model, history, step, res, rec_loss.kind, trainable, data, device, time.time() - t0)
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
def finish_phase(cfg, model: DCAE, history, step, res, perceptual_kind, trainable, data, device, seconds) -> dict:
    phase_dir = Path(cfg.out) / f"phase{cfg.phase}"
    model.eval()
    summary = {"phase": cfg.phase, "model": model.config.name, "residual_autoencoding": model.config.residual_autoencoding,
               "steps": step, "target_steps": cfg.steps, "resolution": res, "batch_size": cfg.batch_size,
               "lr": cfg.phase_value("lr"), "pixel_loss": cfg.pixel_loss, "perceptual": perceptual_kind,
               "gan_weight": cfg.gan_weight if cfg.phase == 3 else 0.0, "trainable_parameters": len(trainable),
               "trainable_tensors_sample": trainable[:6], "data": cfg.data, "data_images": len(data),
               "data_fingerprint": data.fingerprint(), "seconds": round(seconds, 1), "device": str(device)}
    # scaling factor = 1 / RMS of the latents over training crops (paper, appendix B); a phase that
    # leaves the encoder frozen keeps the latent space, so it keeps the factor too
    if any(n.startswith("encoder.") for n in trainable):
        crops, _ = data.random_crops(64, res, step_generator(cfg.seed, 10**9))
        x = to_model_range(crops)
        lat = torch.cat([model.encoder(x[i:i + 16]).float().cpu() for i in range(0, len(x), 16)])
        model.config.scaling_factor = round(1.0 / lat.pow(2).mean().sqrt().item(), 5)
    summary["scaling_factor"] = model.config.scaling_factor
    if Path(cfg.eval_data).is_dir():
        ev = ImageFolder(cfg.eval_data, min_side=64).eval_crops(res)
        x = to_model_range(ev)
        recon = torch.cat([model.decoder(model.encoder(x[i:i + 8].to(device))).cpu() for i in range(0, len(x), 8)])
        summary["eval_psnr"] = round(psnr(recon, x).mean().item(), 3)
        save_image_grid([x[:6], recon[:6].clamp(-1, 1)], phase_dir / "recon.png", ["original", f"phase {cfg.phase}"])
    save_autoencoder(model, phase_dir / "model.safetensors", extra={"training": summary})
    plot_curves(history, phase_dir / "loss.png", f"{model.config.name} phase {cfg.phase}")
    (phase_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return summary


def parse_args(argv=None) -> TrainConfig:
    return parse_dataclass_args(TrainConfig, __doc__, argv)


def main(argv=None):
    try:
        train(parse_args(argv))
    except SetupError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
