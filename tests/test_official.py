"""The released DC-AE generators: exact loading, architectures against independent references,
bad inputs, and the whole path release folder -> ONNX bundle -> app runtime == torch sampler."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, tiny_edge_f64, write_release

from dcae_edge.checkpoints import CheckpointError
from dcae_edge.denoiser import Denoiser
from dcae_edge.official import (DIT_ADM, RELEASES, USIT_ODE, UVIT_DPM, Release, load_diffusion_model, register_release,
                                release_denoiser_config)
from dcae_edge.schedules import SamplerError

FAMILIES = {"uvit": ("uvit", UVIT_DPM, 6), "usit": ("uvit", USIT_ODE, 6), "dit": ("dit", DIT_ADM, 8)}


def tiny_release(family: str, ae_cfg, channels: int = 128, size: int = 2) -> tuple[str, Release]:
    backbone, recipe, steps = FAMILIES[family]
    name = f"tiny-{family}-in-512px"
    rel = Release(backbone, 2, 32, 2, ae_cfg.to_dict(), {**recipe, "steps": steps}, channels, size, 0.5)
    register_release(name, rel)
    return name, rel


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """DiT starts with zeroed outputs: perturb every weight so equality tests can fail."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def tiny_ae():
    return make_model(tiny_edge_f64(), seed=3)


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tiny_ae):
    """One hub-layout folder per family, all sharing the tiny f64 autoencoder."""
    root = tmp_path_factory.mktemp("releases")
    out = {}
    for i, family in enumerate(FAMILIES):
        name, rel = tiny_release(family, tiny_ae.config)
        dn = perturbed(Denoiser(release_denoiser_config(name, rel)), i)
        out[family] = (write_release(root / name, name, tiny_ae, dn), dn)
    return out


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("family", list(FAMILIES))
def test_release_folder_loads_strictly(releases, tiny_ae, family, photos128):
    folder, dn = releases[family]
    m = load_diffusion_model(folder)
    assert m.name == folder.name and m.recipe["null_class"] == 1000 and m.recipe["latent_scaling_factor"] == 0.5
    assert len(m.class_names) == 1000 and m.class_names[207] == "golden retriever"
    x = torch.randn(3, 128, 2, 2)
    t = torch.tensor([1.0, 500.0, 999.0]) if family != "usit" else torch.tensor([0.0, 0.5, 1.0])
    y = torch.tensor([0, 999, 1000])
    with torch.no_grad():
        assert torch.equal(m.denoiser(x, t, y), dn(x, t, y))
        assert torch.equal(m.autoencoder.encode(photos128), tiny_ae.encode(photos128))
    assert m.denoiser.config.learn_sigma == (family == "dit")


def test_paper_parameter_counts_of_every_release():
    """Trainable denoiser parameters of every released generator, to the unit (built on the meta
    device: no memory). UViT f32 counts are efficientvit's; DiT-XL excludes its fixed position table."""
    expect = {"uvit-s": 44_788_768, "uvit-h": 500_868_896, "uvit-2b": 1_580_396_576, "usit-h": 500_868_896,
              "usit-2b": 1_580_396_576, "dit-xl": 674_890_048}
    zoo = [n for n in RELEASES if n.startswith("dc-ae-")]
    assert len(zoo) == 11  # 9 models, two f64 UViTs also as -train2000k; DiT-XL also -trainbs1024
    for name in zoo:
        rel = RELEASES[name]
        with torch.device("meta"):
            dn = Denoiser(release_denoiser_config(name, rel))
        n = sum(p.numel() for p in dn.parameters())
        assert n == rel.parameters, name
        model = name.split("-in-1.0-")[1].removesuffix("-in-512px").split("-in-512px")[0]
        if rel.latent_channels == 32:
            assert n == expect[model], name
        else:  # f64c128: 8x8x128 latents change the patch embedding, head and position table
            assert round(n / 1e6, 2) == round(expect[model] / 1e6, 2), name
    with torch.device("meta"):
        dit = Denoiser(release_denoiser_config("dit", RELEASES["dc-ae-f32c32-in-1.0-dit-xl-in-512px"]))
    assert tuple(dit.net.pos_embed.shape) == (1, 256, 1152) and "net.pos_embed" in dit.state_dict()


def test_our_own_checkpoint_loads_through_the_same_call(tmp_path):
    from dcae_edge.denoiser import save_denoiser

    from conftest import tiny_denoiser

    dn = tiny_denoiser(input_size=4, in_channels=128)
    save_denoiser(dn, tmp_path / "dn.safetensors", extra={"autoencoder_source": "f64", "class_names": ["a", "b", "c"],
                                                          "latent_fingerprint": _bundled_latent_fingerprint()})
    m = load_diffusion_model(tmp_path / "dn.safetensors")
    assert m.class_names == ["a", "b", "c"] and m.recipe["kind"] == "flow" and m.recipe["null_class"] == 3


def _bundled_latent_fingerprint() -> str:
    from dcae_edge.checkpoints import latent_fingerprint, load_autoencoder

    return latent_fingerprint(load_autoencoder("f64"))


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_release_folders_are_refused_clearly(releases, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = releases["uvit"]
    state = load_file(str(folder / "model.safetensors"))

    def variant(name, edit=None, model_name=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_name": model_name or folder.name}))
        s = dict(state)
        if edit:
            edit(s)
        save_file(s, str(d / "model.safetensors"))
        return d

    with pytest.raises(CheckpointError, match="not a known DC-AE generator release"):
        load_diffusion_model(variant("unknown", model_name="dc-ae-f64c128-in-1.0-uvit-xxl-in-512px"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\):\n    mid_block.attn.qkv.weight"):
        load_diffusion_model(variant("missing", lambda s: s.pop("diffusion_model.mid_block.attn.qkv.weight")))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\):\n    extra.weight"):
        load_diffusion_model(variant("extra", lambda s: s.update({"diffusion_model.extra.weight": torch.zeros(1)})))
    with pytest.raises(CheckpointError, match="NaN"):
        load_diffusion_model(variant("nan", lambda s: s["diffusion_model.norm.weight"].fill_(float("nan"))))
    dit_folder, _ = releases["dit"]
    d = tmp_path / "dit-as-uvit"
    shutil.copytree(dit_folder, d)
    (d / "config.json").write_text(json.dumps({"model_name": folder.name}))
    with pytest.raises(CheckpointError, match="looks like a DIT .* is a UVIT release"):
        load_diffusion_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_diffusion_model(d)
    for bad in ("./nope", "../ckpt", "nope"):
        with pytest.raises(CheckpointError, match="no such file or folder"):
            load_diffusion_model(bad)


def test_bad_sampling_options_are_refused(releases):
    from dcae_edge.sample import generate_latents

    m = load_diffusion_model(releases["uvit"][0])
    for kwargs, msg in (({"class_labels": [1000]}, "class ids"), ({"class_labels": [-1]}, "class ids"),
                        ({"class_labels": [1], "steps": 0}, "steps"), ({"class_labels": [1], "cfg_scale": 0.5}, "cfg"),
                        ({"class_labels": [1], "sampler": "euler"}, "does not apply")):
        with pytest.raises(SamplerError, match=msg):
            generate_latents(m.denoiser, recipe=m.recipe, **kwargs)


# ---------------------------------------------------------------------------------------------- architectures
def test_dit_equals_diffusers_dit_transformer(releases):
    """Original DiT key names mapped to diffusers' as its convert_dit_to_diffusers.py does.
    diffusers' timestep projection divides the frequencies by (half - 1), facebookresearch DiT by
    half: set downscale_freq_shift = 0 to compare the same maths (and show it matters)."""
    from diffusers import DiTTransformer2DModel

    _, dn = releases["dit"]
    cfg = dn.config
    ref = DiTTransformer2DModel(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                                in_channels=cfg.in_channels, out_channels=2 * cfg.in_channels, num_layers=cfg.depth,
                                sample_size=cfg.input_size, patch_size=1, activation_fn="gelu-approximate",
                                num_embeds_ada_norm=cfg.num_classes, norm_type="ada_norm_zero",
                                norm_elementwise_affine=False, norm_eps=1e-6, attention_bias=True).eval()
    s = {k[len("net."):]: v for k, v in dn.state_dict().items()}
    m = {"pos_embed.proj.weight": s["x_embedder.proj.weight"], "pos_embed.proj.bias": s["x_embedder.proj.bias"],
         "proj_out_1.weight": s["final_layer.adaLN_modulation.1.weight"], "proj_out_1.bias": s["final_layer.adaLN_modulation.1.bias"],
         "proj_out_2.weight": s["final_layer.linear.weight"], "proj_out_2.bias": s["final_layer.linear.bias"]}
    for i in range(cfg.depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            m[o + "norm1.emb.timestep_embedder.linear_1." + w] = s["t_embedder.mlp.0." + w]
            m[o + "norm1.emb.timestep_embedder.linear_2." + w] = s["t_embedder.mlp.2." + w]
            m[o + "norm1.linear." + w] = s[b + "adaLN_modulation.1." + w]
            for name, part in zip("qkv", s[b + "attn.qkv." + w].chunk(3, 0)):
                m[o + f"attn1.to_{name}." + w] = part
            m[o + "attn1.to_out.0." + w] = s[b + "attn.proj." + w]
            m[o + "ff.net.0.proj." + w] = s[b + "mlp.fc1." + w]
            m[o + "ff.net.2." + w] = s[b + "mlp.fc2." + w]
        m[o + "norm1.emb.class_embedder.embedding_table.weight"] = s["y_embedder.embedding_table.weight"]
    missing, unexpected = ref.load_state_dict(m, strict=False)
    assert not unexpected and all("pos_embed.pos_embed" in k for k in missing)
    ref.pos_embed.pos_embed.copy_(s["pos_embed"])
    x, t, y = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size), torch.tensor([0.0, 411.0, 999.0]), torch.tensor([5, 0, 1000])
    with torch.no_grad():
        ours = dn(x, t, y)
        shifted = ref(x, timestep=t, class_labels=y).sample
        for blk in ref.transformer_blocks:
            blk.norm1.emb.time_proj.downscale_freq_shift = 0
        theirs = ref(x, timestep=t, class_labels=y).sample
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - shifted).abs().max() > 1e-4  # the frequency convention is not cosmetic


def uvit_reference(sd: dict, x, t, y, heads: int, depth: int) -> torch.Tensor:
    """U-ViT written out from the state dict alone (efficientvit's maths, nothing shared with ours)."""
    b, c, h, w = x.shape
    d = sd["norm.weight"].shape[0]

    def ln(v, p):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + 1e-5) * sd[p + ".weight"] + sd[p + ".bias"]

    def block(v, p, skip=None):
        if skip is not None:
            v = torch.cat([v, skip], -1) @ sd[p + ".skip_linear.weight"].T + sd[p + ".skip_linear.bias"]
        q, k, vv = (ln(v, p + ".norm1") @ sd[p + ".attn.qkv.weight"].T).chunk(3, -1)
        split = lambda a: a.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads), -1) @ split(vv)
        v = v + att.transpose(1, 2).reshape(b, -1, d) @ sd[p + ".attn.proj.weight"].T + sd[p + ".attn.proj.bias"]
        hid = ln(v, p + ".norm2") @ sd[p + ".mlp.fc1.weight"].T + sd[p + ".mlp.fc1.bias"]
        hid = 0.5 * hid * (1 + torch.erf(hid / math.sqrt(2)))
        return v + hid @ sd[p + ".mlp.fc2.weight"].T + sd[p + ".mlp.fc2.bias"]

    patches = torch.einsum("bchw,dc->bhwd", x, sd["patch_embed.proj.weight"][:, :, 0, 0]).reshape(b, h * w, d)
    patches = patches + sd["patch_embed.proj.bias"]
    half = d // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    tt = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    v = torch.cat([sd["label_emb.embedding_table.weight"][y][:, None], tt[:, None], patches], 1) + sd["pos_embed"]
    skips = []
    for i in range(depth // 2):
        v = block(v, f"in_blocks.{i}")
        skips.append(v)
    v = block(v, "mid_block")
    for i in range(depth // 2):
        v = block(v, f"out_blocks.{i}", skips.pop())
    out = ln(v, "norm") @ sd["decoder_pred.weight"].T + sd["decoder_pred.bias"]
    return out[:, 2:].reshape(b, h, w, c).permute(0, 3, 1, 2)


def test_uvit_equals_hand_written_reference(releases):
    folder, dn = releases["uvit"]
    sd = {k[len("net."):]: v for k, v in dn.state_dict().items()}
    x, t, y = torch.randn(2, 128, 2, 2), torch.tensor([1.0, 734.5]), torch.tensor([999, 1000])
    with torch.no_grad():
        ref = uvit_reference(sd, x, t, y, dn.config.num_heads, dn.config.depth)
        assert (dn(x, t, y) - ref).abs().max() <= 1e-5
        assert ref.abs().max() > 0.1


# ---------------------------------------------------------------------------------------------- export -> runtime
@pytest.fixture(scope="module")
def decoder_bundle(releases, tmp_path_factory):
    """The shared tiny autoencoder's decoder, exported once from one of the release folders."""
    from export.common import run_cli
    from export.onnx import main

    out = tmp_path_factory.mktemp("bundles") / "decoder-only"
    assert run_cli(main, ["--weights", str(releases["uvit"][0]), "--graphs", "vae_decoder", "--denoiser", "none",
                          "--resolution", "128", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_release_exports_and_generates_like_torch(releases, decoder_bundle, family, tmp_path):
    """transformer parity on the family's own sampler trajectories at export time, then the app
    runtime's image from given noise equals the torch sampler + decoder within 1e-4."""
    from export.common import run_cli
    from export.onnx import main
    from runtimes import open_bundle

    from dcae_edge.sample import generate_latents

    folder, _ = releases[family]
    out = tmp_path / "bundle"
    shutil.copytree(decoder_bundle, out)
    assert run_cli(main, ["--weights", str(folder), "--graphs", "transformer", "--out", str(out), "--resolution", "128"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    art = manifest["graphs"]["transformer"]["artifacts"]["onnx/fp32"]
    assert art["validation"]["pass"] and set(manifest["graphs"]) == {"vae_decoder", "transformer"}
    assert manifest["sampler"]["solver"]["name"] == {"uvit": "dpm_solver++", "usit": "dopri5", "dit": "adm"}[family]
    assert manifest["denoiser"]["source"] == folder.name and str(folder.parent) not in (out / "manifest.json").read_text()
    if family == "dit":  # ADM ancestral steps need the learned variance: the graph keeps 2C channels
        assert manifest["graphs"]["transformer"]["outputs"][0]["shape"][1] == 256
    m = load_diffusion_model(folder)
    noise = np.random.default_rng(3).standard_normal((2, 128, 2, 2)).astype(np.float32)
    pipe = open_bundle(out)
    images, z = pipe.generate([3, 999], seed=5, latents=noise, return_latents=True)
    zt = generate_latents(m.denoiser, [3, 999], seed=5, recipe=m.recipe, latents=noise)
    with torch.no_grad():
        ref = m.autoencoder.decode(zt / m.scaling_factor).numpy()
    np.testing.assert_allclose(z, zt.numpy(), atol=1e-4, rtol=1e-5)
    assert np.abs(images - ref).max() <= 1e-4
    # class names work through the app API too, and bad options are clear errors
    assert pipe.class_ids(["golden retriever", 3]) == [207, 3]
    from runtimes import BundleError

    with pytest.raises(BundleError, match="class id 1000 is out of range"):
        pipe.generate([1000])
    with pytest.raises(BundleError, match="steps must be"):
        pipe.generate([1], steps=0)


@pytest.mark.slow
def test_release_through_openvino_coreml_and_int8(releases, decoder_bundle, tmp_path):
    """The other exporters and calibration take a released model as they take ours: OpenVINO IR and a
    Core ML package of the U-ViT, INT8 calibrated on its own DPM-Solver trajectories."""
    from calibration.__main__ import run_cli as calibrate
    from export import coreml, openvino

    folder, _ = releases["uvit"]
    out = tmp_path / "bundle"
    shutil.copytree(decoder_bundle, out)
    from export.common import run_cli
    from export.onnx import main

    assert run_cli(main, ["--weights", str(folder), "--graphs", "transformer", "--out", str(out), "--resolution", "128"]) == 0
    assert run_cli(openvino.main, ["--weights", str(folder), "--graphs", "transformer", "--out", str(out),
                                   "--resolution", "128"]) == 0
    assert run_cli(coreml.main, ["--weights", str(folder), "--graphs", "transformer", "--out", str(out),
                                 "--resolution", "128"]) == 0
    assert calibrate(["--bundle", str(out), "--backend", "openvino", "--graphs", "transformer", "--num-samples", "12",
                      "--num-eval", "6", "--steps", "6", "--cache-dir", str(tmp_path / "sets")]) == 0
    m = json.loads((out / "manifest.json").read_text())
    arts = m["graphs"]["transformer"]["artifacts"]
    assert arts["openvino/fp32"]["validation"]["pass"] and any(k.startswith("coreml/") for k in arts)
    assert arts["openvino/int8"]["gate"]["pass"]
    assert "6 steps, cfg 1.5" in arts["openvino/int8"]["calibration_set"]["source"]  # the recipe's own guidance
