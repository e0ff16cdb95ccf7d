"""Image-quality metrics in torch (no downloads): PSNR, SSIM, MS-SSIM; LPIPS only when the
``lpips`` package and its weights are already on disk. Inputs are in [-1, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5, device=None) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None].repeat(3, 1, 1, 1)


def _ssim_parts(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor):
    # local variances are differences of large terms: never compute them in bf16/fp16 autocast
    with torch.autocast(a.device.type, enabled=False):
        return _ssim_parts_fp32(a.float(), b.float(), window.float())


def _ssim_parts_fp32(a: torch.Tensor, b: torch.Tensor, window: torch.Tensor):
    # images mapped to [0, 1] so the usual constants (K1=0.01, K2=0.03, L=1) apply
    a, b = (a + 1) / 2, (b + 1) / 2
    c1, c2 = 0.01**2, 0.03**2
    conv = lambda x: F.conv2d(x, window, groups=3)  # noqa: E731
    mu_a, mu_b = conv(a), conv(b)
    var_a = conv(a * a) - mu_a**2
    var_b = conv(b * b) - mu_b**2
    cov = conv(a * b) - mu_a * mu_b
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    lum = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return lum * cs, cs


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, sigma 1.5)."""
    s, _ = _ssim_parts(a, b, _gaussian_window(device=a.device))
    return s.flatten(1).mean(1)


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim(a: torch.Tensor, b: torch.Tensor, scales: int | None = None) -> torch.Tensor:
    """Per-image multi-scale SSIM (Wang et al. 2003); uses as many scales as the size allows."""
    window = _gaussian_window(device=a.device)
    max_scales = 1
    while min(a.shape[-2:]) // 2 ** max_scales >= 11 and max_scales < 5:
        max_scales += 1
    n = min(scales or 5, max_scales)
    w = torch.tensor(MS_SSIM_WEIGHTS[:n], device=a.device)
    w = w / w.sum()
    vals = []
    for i in range(n):
        s, cs = _ssim_parts(a, b, window)
        vals.append((s if i == n - 1 else cs).flatten(1).mean(1).clamp_min(1e-6))
        if i < n - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    return torch.prod(torch.stack(vals, 0) ** w[:, None], dim=0)


def try_lpips(device="cpu"):
    """An LPIPS(VGG) module if the ``lpips`` package and its backbone weights are available
    offline, else None. Never downloads."""
    try:
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import lpips  # type: ignore
        import torch.hub

        ckpt_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
        if not any(f.startswith("vgg16") for f in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else [])):
            return None
        return lpips.LPIPS(net="vgg", verbose=False).to(device).eval()
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        return None
