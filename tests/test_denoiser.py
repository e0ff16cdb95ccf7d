"""Latent diffusion transformers: paper parameter counts, sampler maths, training on real-photo
latents, determinism, DDP, ONNX parity on trajectory inputs, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_model, tiny_denoiser, tiny_edge_f64
from dcae_edge import schedules
from dcae_edge.checkpoints import save_autoencoder
from dcae_edge.denoiser import DENOISER_PRESETS, build_denoiser, load_denoiser, save_denoiser
from dcae_edge.sample import generate_latents

PAPER_MILLIONS = {"uvit-s": 44.79, "uvit-h": 500.87, "uvit-2b": 1580.40, "dit-xl": 674.89}


@pytest.mark.parametrize("name", sorted(PAPER_MILLIONS))
def test_paper_presets_match_the_model_zoo(name):
    with torch.device("meta"):
        model = build_denoiser(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PAPER_MILLIONS[name]


# ---------------------------------------------------------------------------------------------- sampling
# (the sampler maths itself: tests/test_samplers.py)
@pytest.mark.parametrize("arch,prediction", [("dit", "flow"), ("uvit", "eps")])
def test_sampling_is_deterministic_for_a_seed(arch, prediction):
    model = tiny_denoiser(input_size=4, in_channels=8, arch=arch, num_heads=2, prediction=prediction).eval()
    a = generate_latents(model, [0, 2], steps=6, cfg_scale=3.0, seed=11)
    b = generate_latents(model, [0, 2], steps=6, cfg_scale=3.0, seed=11)
    c = generate_latents(model, [0, 2], steps=6, cfg_scale=3.0, seed=12)
    assert a.shape == (2, 8, 4, 4) and torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("arch", ["dit", "uvit"])
def test_executorch_forms_are_the_models_attention_and_layer_norms(arch):
    """export.graph_forms' softmax_attention, qkv_slices and layer_norm_by_means (ExecuTorch: SDPA's decomposition,
    4-D matmuls, the q/k/v selects and native_layer_norm ran outside XNNPACK) compute what the model does, and leave
    the model as it was."""
    from torch import nn

    from dcae_edge.denoiser import Attention
    from export.graph_forms import graph_forms

    model = tiny_denoiser(input_size=4, in_channels=8, arch=arch, num_heads=2).eval()
    x = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10.0, 500.0]), torch.tensor([0, 2])
    with torch.no_grad():
        before = model(x, t, y)
        with graph_forms(model, ("softmax_attention", "qkv_slices", "layer_norm_by_means")) as switched:
            inside = model(x, t, y)
        after = model(x, t, y)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and any(m.weight is None for m in norms) == (arch == "dit")  # DiT's adaLN norms have no affine
    assert switched == 2 * sum(isinstance(m, Attention) for m in model.modules()) + len(norms)
    assert (inside - before).abs().max() <= 1e-5 * before.abs().max() and torch.equal(after, before)
    assert not any({"attend", "forward"} & set(vars(m)) for m in model.modules())


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dn")
    photos = d / "photos"
    for i, p in enumerate(sorted((ROOT / "dcae_edge" / "assets").glob("*.jpg"))):
        (photos / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, photos / f"class{i % 2}" / p.name)
    ae = d / "ae.safetensors"
    save_autoencoder(make_model(tiny_edge_f64()), ae)
    return d, photos, ae


def dn_args(setup, out, steps, *extra):
    d, photos, ae = setup
    return ["--autoencoder", str(ae), "--data", str(photos), "--out", str(out), "--resolution", "128",
            "--crops-per-image", "4", "--model", "dit-tiny", "--hidden-size", "32", "--depth", "2",
            "--batch-size", "8", "--steps", str(steps), "--lr", "2e-3", "--warmup", "1", "--amp", "fp32",
            "--device", "cpu", "--log-every", "1", "--ckpt-every", "1000", *extra]


def test_training_loss_decreases_on_real_photo_latents(setup, tmp_path):
    from dcae_edge import train_denoiser as TD

    summary = TD.train(TD.parse_args(dn_args(setup, tmp_path, 40)))
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    losses = [h["loss"] for h in json.loads(ck["history"])]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    model, meta = load_denoiser(tmp_path / "model.safetensors")
    assert meta["class_names"] == ["class0", "class1"] and model.config.num_classes == 2
    assert summary["steps"] == 40 and (tmp_path / "samples.png").is_file() and (tmp_path / "loss.png").is_file()
    cache = __import__("safetensors.torch", fromlist=["load_file"]).load_file(tmp_path / "latents.safetensors")
    assert cache["latents"].shape[1:] == (128, 2, 2) and len(cache["labels"]) == 16


def test_flow_time_sampling_reaches_the_high_noise_steps():
    from dcae_edge import train_denoiser as TD

    def share_above(**kw):  # fraction of training times at t > 0.9 (t = 1 is pure noise)
        t = TD.sample_flow_time(TD.DenoiserTrainConfig(batch_size=20000, **kw), torch.Generator().manual_seed(0))
        assert t.min() >= 0 and t.max() <= 1
        return float((t > 0.9).float().mean())

    assert share_above() < 0.03 < 0.08 < share_above(time_sampling="uniform") < 0.12
    assert share_above(time_shift=3.0) > 0.1
    with pytest.raises(ValueError, match="time-sampling"):
        share_above(time_sampling="cosine")


def test_init_from_warm_starts_weights_with_a_fresh_run(setup, tmp_path):
    from dcae_edge import train_denoiser as TD

    TD.train(TD.parse_args(dn_args(setup, tmp_path / "a", 3)))
    first = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    TD.train(TD.parse_args(dn_args(setup, tmp_path / "b", 0, "--init-from", str(tmp_path / "a" / "ckpt.pt"))))
    warm = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert warm["step"] == 0 and all(torch.equal(first["ema"][k], warm["model"][k]) for k in first["ema"])
    with pytest.raises(SystemExit, match="no such file"):
        TD.main(dn_args(setup, tmp_path / "c", 1, "--init-from", str(tmp_path / "missing.pt")))
    with pytest.raises(SystemExit, match="class-conditional U-ViT"):  # dn_args trains a DiT
        TD.main(dn_args(setup, tmp_path / "d", 1, "--label-every-token"))
    assert not (tmp_path / "d").exists()
    # a typo in the preset, a missing photo folder or autoencoder: one line, before anything is encoded
    for extra, message in [(["--model", "dit-huge"], "--model 'dit-huge': known presets"),
                           (["--data", str(tmp_path / "none")], "--data: image folder .* does not exist"),
                           (["--autoencoder", str(tmp_path / "none.safetensors")], "--autoencoder: .*no such file")]:
        with pytest.raises(SystemExit, match=message):
            TD.main(dn_args(setup, tmp_path / "e", 1, *extra))
    assert not (tmp_path / "e" / "latents.safetensors").exists()


def test_cache_from_another_autoencoder_is_refused(setup, tmp_path):
    from dcae_edge import train_denoiser as TD

    TD.train(TD.parse_args(dn_args(setup, tmp_path, 1)))
    other = tmp_path / "other.safetensors"
    save_autoencoder(make_model(tiny_edge_f64(), seed=9), other)
    args = dn_args(setup, tmp_path, 2)
    args[args.index("--autoencoder") + 1] = str(other)
    with pytest.raises(ValueError, match="encoded with another autoencoder"):
        TD.train(TD.parse_args(args))


def test_ddp_two_processes_keep_replicas_identical(setup, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "dcae_edge.train_denoiser", *dn_args(setup, tmp_path, 3)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "ddp.json").read_text()) == {"world": 2, "replicas_identical": True}


@pytest.mark.parametrize("options", [{}, {"flow_skip": True}, {"arch": "uvit", "flow_skip": True, "label_every_token": True},
                                     {"arch": "uvit", "flow_skip": True, "class_prior": True}],
                         ids=["plain", "flow-skip", "uvit-label-every-token", "uvit-class-prior"])
def test_onnx_parity_on_trajectory_inputs(setup, tmp_path, options):
    import onnxruntime as ort

    from export import onnx as ex

    d, photos, ae = setup
    model = tiny_denoiser(input_size=2, num_classes=2, **options).eval()
    save_denoiser(model, tmp_path / "dn.safetensors")
    ex.main(["--variant", "f64", "--weights", str(ae), "--denoiser", str(tmp_path / "dn.safetensors"), "--out",
             str(tmp_path / "b"), "--resolution", "128", "--graphs", "transformer"])
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    art = m["graphs"]["transformer"]["artifacts"]["onnx/fp32"]
    assert art["validation"]["pass"]
    rows = art["validation"]["results"]
    assert [r["sizes"]["batch"] for r in rows] == [2, 4]  # CFG batch and an unseen batch
    assert all(r["max_abs"] < 1e-4 and r["cosine"] > 0.9999 for r in rows)
    assert [t["name"] for t in m["graphs"]["transformer"]["inputs"]] == ["hidden_states", "timestep", "class_labels"]
    assert m["denoiser"]["class_names"] == [] and m["sampler"]["solver"]["name"] == "euler"
    assert "/" not in m["denoiser"]["source"]  # names, never this machine's paths
    # against the torch model the sampler calls (its forward, flow_skip / class_prior terms included),
    # not only against the export wrapper
    g = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(3, 128, 2, 2, generator=g), torch.tensor([1000.0, 700.0, 50.0]), torch.tensor([0, 1, 2])
    sess = ort.InferenceSession(str(tmp_path / "b" / "transformer" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"hidden_states": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()})[0]
    with torch.no_grad():
        want = model(x, t, y).numpy()
    assert np.abs(got - want).max() < 1e-4


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_denoiser_inputs_are_refused():
    model = build_denoiser("dit-tiny", input_size=4, in_channels=8, num_classes=3, hidden_size=32, depth=1)
    x = torch.zeros(2, 8, 4, 4)
    with pytest.raises(ValueError, match="latents must be B x 8 x 4 x 4"):
        model.check_inputs(torch.zeros(2, 16, 4, 4), torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1000\]"):
        model.check_inputs(x, torch.tensor([5.0, 1001.0]), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\]"):
        model.check_inputs(x, torch.zeros(2), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class ids"):
        generate_latents(model, [7], steps=2)
    uncond = build_denoiser("dit-tiny", input_size=4, in_channels=8, hidden_size=32, depth=1)
    with pytest.raises(ValueError, match="classifier-free guidance needs a class-conditional"):
        generate_latents(uncond, None, steps=2, cfg_scale=3.0)
    with pytest.raises(ValueError, match="unconditional"):
        generate_latents(uncond, [1], steps=2)


def test_unknown_preset():
    with pytest.raises(KeyError, match="dit-xl"):
        build_denoiser("dit-xxl")
    assert {"dit-tiny", "uvit-tiny", "uvit-h", "dit-xl"} <= set(DENOISER_PRESETS)


def test_flow_skip_adds_the_linear_velocity_guess_and_survives_saving(tmp_path):
    model = build_denoiser("uvit-tiny", input_size=4, in_channels=8, num_classes=3, hidden_size=32, depth=2,
                           flow_skip=True).eval()
    torch.nn.init.zeros_(model.net.decoder_pred.weight)
    torch.nn.init.zeros_(model.net.decoder_pred.bias)  # the network says 0: what is left is the skip
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        out = model(x, torch.tensor([0.0, 500.0, 1000.0]), torch.tensor([0, 1, 3]))
    torch.testing.assert_close(out[0], -x[0])
    torch.testing.assert_close(out[2], x[2])
    torch.testing.assert_close(out[1], torch.zeros_like(x[1]))
    save_denoiser(model, tmp_path / "m.safetensors")
    again, _ = load_denoiser(tmp_path / "m.safetensors")
    assert again.config.flow_skip
    with pytest.raises(ValueError, match="flow_skip"):
        build_denoiser("uvit-tiny", prediction="eps", flow_skip=True)


def test_class_prior_is_the_gaussian_velocity_and_starts_from_the_data_means(setup, tmp_path):
    """With the network silent, output = c(t) x_t - s(t) mean[class]: x_t - mean at t = 1, -x_t at t = 0;
    the trainer starts the means from the latent cache (null class: the mean of all)."""
    from dcae_edge import train_denoiser as TD
    from dcae_edge.denoiser import class_prior_scale

    model = build_denoiser("uvit-tiny", input_size=4, in_channels=8, num_classes=3, hidden_size=32, depth=2,
                           flow_skip=True, class_prior=True).eval()
    torch.nn.init.zeros_(model.net.decoder_pred.weight)
    torch.nn.init.zeros_(model.net.decoder_pred.bias)
    torch.nn.init.normal_(model.class_means)
    x = torch.randn(3, 8, 4, 4)
    with torch.no_grad():
        out = model(x, torch.tensor([1000.0, 0.0, 500.0]), torch.tensor([1, 3, 2]))
    torch.testing.assert_close(out[0], x[0] - model.class_means[1])
    torch.testing.assert_close(out[1], -x[1])
    torch.testing.assert_close(out[2], -class_prior_scale(torch.tensor([500.0]), x)[0] * model.class_means[2])
    save_denoiser(model, tmp_path / "m.safetensors")
    again, _ = load_denoiser(tmp_path / "m.safetensors")
    assert again.config.class_prior and torch.equal(again.class_means, model.class_means)
    with pytest.raises(ValueError, match="class_prior needs flow_skip"):
        build_denoiser("uvit-tiny", num_classes=3, class_prior=True)
    # the trainer: means from the data, then training moves them
    args = dn_args(setup, tmp_path / "run", 0, "--model", "uvit-tiny", "--flow-skip", "--class-prior")
    TD.train(TD.parse_args(args))
    from safetensors.torch import load_file

    cache = load_file(str(tmp_path / "run" / "latents.safetensors"))
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    means = ck["model"]["class_means"]
    torch.testing.assert_close(means[-1], cache["latents"].mean(0))
    for k in cache["labels"].unique():
        torch.testing.assert_close(means[k], cache["latents"][cache["labels"] == k].mean(0))
    with pytest.raises(SystemExit, match="--class-prior needs --flow-skip"):
        TD.main(dn_args(setup, tmp_path / "bad", 1, "--class-prior"))
    # a warm start keeps the init's (learned) means, unless told the init saw another latent space
    shifted = {k: (v + 5.0 if k == "class_means" else v) for k, v in ck["model"].items()}
    torch.save({"ema": shifted}, tmp_path / "shifted.pt")
    for flag, expect in (([], shifted["class_means"]), (["--class-means-from-data"], means)):
        out = tmp_path / f"warm{len(flag)}"
        TD.train(TD.parse_args(dn_args(setup, out, 0, "--model", "uvit-tiny", "--flow-skip", "--class-prior",
                                       "--init-from", str(tmp_path / "shifted.pt"), "--cache",
                                       str(tmp_path / "run" / "latents.safetensors"), *flag)))
        warm = torch.load(out / "ckpt.pt", weights_only=True)
        torch.testing.assert_close(warm["model"]["class_means"], expect)
        torch.testing.assert_close(warm["ema"]["class_means"], expect)
    with pytest.raises(SystemExit, match="needs --class-prior and --init-from"):
        TD.main(dn_args(setup, tmp_path / "bad2", 1, "--class-means-from-data"))


def test_label_every_token_reaches_every_patch_token_and_survives_saving(tmp_path):
    """With the class embedding on every patch token, the class changes the output even when no
    attention reads the label token (here: attention output projections zeroed)."""
    kw = dict(input_size=4, in_channels=8, num_classes=3, hidden_size=32, depth=2)
    model = build_denoiser("uvit-tiny", label_every_token=True, **kw).eval()
    plain = build_denoiser("uvit-tiny", **kw).eval()
    plain.load_state_dict(model.state_dict())
    for m in (model, plain):
        torch.nn.init.normal_(m.net.label_emb.embedding_table.weight)
        for blk in [*m.net.in_blocks, m.net.mid_block, *m.net.out_blocks]:
            torch.nn.init.zeros_(blk.attn.proj.weight)
    plain.load_state_dict(model.state_dict())
    x, t = torch.randn(1, 8, 4, 4).expand(2, 8, 4, 4), torch.full((2,), 500.0)  # one latent, two classes
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([0, 1])), plain(x, t, torch.tensor([0, 1]))
    assert (a[0] - a[1]).abs().max() > 1e-3 and (b[0] - b[1]).abs().max() < 1e-6
    save_denoiser(model, tmp_path / "m.safetensors")
    again, _ = load_denoiser(tmp_path / "m.safetensors")
    assert again.config.label_every_token
    with pytest.raises(ValueError, match="class-conditional U-ViT"):
        build_denoiser("dit-tiny", label_every_token=True, **kw)
