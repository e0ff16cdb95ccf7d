"""DC-AE in torch: exact parameter counts, shortcut definitions, diffusers equivalence on real
photos, checkpoint formats, bad inputs."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, tiny_in_mix, tiny_sana
from dcae_edge import CheckpointError, build_autoencoder, load_autoencoder, save_autoencoder, save_diffusers
from dcae_edge.autoencoder import DCAE, DownBlock, UpBlock, channel_to_space_duplicate, count_parameters, space_to_channel_average
from dcae_edge.checkpoints import diffusers_to_ours, efficientvit_to_ours, ours_to_diffusers, ours_to_efficientvit
from dcae_edge.presets import EDGE, PUBLISHED, get_config

OFFICIAL_PARAMS = {  # efficientvit / diffusers checkpoints, to the unit
    "dc-ae-f32c32-in-1.0": 323_356_460, "dc-ae-f32c32-mix-1.0": 323_356_460,
    "dc-ae-f64c128-in-1.0": 676_896_140, "dc-ae-f64c128-mix-1.0": 676_896_140,
    "dc-ae-f128c512-in-1.0": 1_120_682_252, "dc-ae-f128c512-mix-1.0": 1_120_682_252,
    "dc-ae-f32c32-sana-1.0": 312_250_275, "dc-ae-f32c32-sana-1.1": 312_250_275,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts_exact(name):
    with torch.device("meta"):  # no memory: 1.1 B parameters cost nothing here
        model = DCAE(get_config(name))
    assert count_parameters(model) == OFFICIAL_PARAMS[name]


def test_published_scaling_factors_and_shapes():
    assert get_config("dc-ae-f64c128-in-1.0").scaling_factor == 0.2889
    assert get_config("dc-ae-f64c128-mix-1.0").scaling_factor == 0.4538
    assert get_config("mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers").scaling_factor == 0.41407
    for name, f in (("dc-ae-f32c32-in-1.0", 32), ("dc-ae-f64c128-in-1.0", 64), ("dc-ae-f128c512-in-1.0", 128)):
        assert get_config(name).spatial_compression == f


@pytest.mark.parametrize("name", sorted(EDGE))
def test_edge_presets_keep_the_design(name):
    cfg = get_config(name)
    ref = get_config({"dc-ae-edge-f32c32": "dc-ae-f32c32-in-1.0", "dc-ae-edge-f64c128": "dc-ae-f64c128-in-1.0",
                      "dc-ae-edge-f128c512": "dc-ae-f128c512-in-1.0"}[name])
    for key in ("latent_channels", "encoder_block_types", "decoder_block_types", "decoder_norm_types", "decoder_act_fns",
                "downsample_block_type", "upsample_block_type"):
        assert getattr(cfg, key) == getattr(ref, key), key
    model = build_autoencoder(name)
    x = torch.zeros(1, 3, cfg.spatial_compression * 2, cfg.spatial_compression * 2)
    assert model.encode(x).shape == (1, cfg.latent_channels, 2, 2)
    assert count_parameters(model) < 20_000_000


# ---------------------------------------------------------------------------------------------- shortcuts
def test_down_shortcut_equal_channels_is_2x2_average_pooling():
    x = torch.randn(2, 8, 6, 10)
    assert torch.allclose(space_to_channel_average(x, 8), F.avg_pool2d(x, 2), atol=1e-6)


def test_down_shortcut_doubling_channels_averages_horizontal_pairs():
    x = torch.randn(1, 4, 4, 4)
    y = space_to_channel_average(x, 8)
    # output channel 2c+i = mean of row-parity i, both column parities, of input channel c
    for c in range(4):
        for i in range(2):
            want = (x[:, c, i::2, 0::2] + x[:, c, i::2, 1::2]) / 2
            assert torch.allclose(y[:, 2 * c + i], want, atol=1e-6)


def test_up_shortcut_equal_channels_is_nearest_upsampling():
    x = torch.randn(2, 8, 3, 5)
    assert torch.equal(channel_to_space_duplicate(x, 8), F.interpolate(x, scale_factor=2, mode="nearest"))


def test_up_shortcut_halving_channels_takes_channel_pair_by_row_parity():
    x = torch.randn(1, 8, 3, 3)
    y = channel_to_space_duplicate(x, 4)
    for c in range(4):
        for i in range(2):
            assert torch.equal(y[:, c, i::2, 0::2], x[:, 2 * c + i])
            assert torch.equal(y[:, c, i::2, 1::2], x[:, 2 * c + i])


def test_up_block_adds_its_shortcut_before_pixel_shuffle_bit_for_bit():
    """UpBlock adds the duplicated channels before its one pixel_shuffle (faster on every backend):
    the same values as the paper's form, pixel_shuffle(conv(x)) + channel_to_space_duplicate(x)."""
    torch.manual_seed(0)
    for cin, cout in [(8, 8), (8, 4), (4, 8)]:
        block = UpBlock(cin, cout, interpolate=False, shortcut=True)
        x = torch.randn(2, cin, 5, 3)
        with torch.no_grad():
            want = F.pixel_shuffle(block.conv(x), 2) + channel_to_space_duplicate(x, cout)
            assert torch.equal(block(x), want)


def test_latent_interface_shortcuts(photos128):
    """Encoder output = conv(h) + mean over consecutive channel groups of h; decoder input =
    conv(z) + each latent channel repeated (repeat_interleave)."""
    model = make_model(tiny_in_mix(latent=16))
    enc, dec = model.encoder, model.decoder
    seen = {}
    enc.conv_out.register_forward_hook(lambda m, i, o: seen.__setitem__("h", i[0]))
    dec.up_blocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("d", i[0]))
    with torch.no_grad():
        z = enc(photos128)
        h = seen["h"]
        groups = h.shape[1] // 16
        want = enc.conv_out(h) + torch.stack([h[:, c * groups:(c + 1) * groups].mean(1) for c in range(16)], 1)
        assert torch.allclose(z, want, atol=1e-6)
        dec(z)
        assert torch.allclose(seen["d"], dec.conv_in(z) + torch.repeat_interleave(z, dec.in_repeats, dim=1), atol=1e-6)


def test_plain_switch_removes_every_shortcut(photos128):
    cfg = tiny_in_mix()
    cfg.residual_autoencoding = False
    plain = DCAE(cfg)
    blocks = [m for m in plain.modules() if isinstance(m, (DownBlock, UpBlock))]
    assert blocks and not any(b.shortcut for b in blocks)
    assert not plain.encoder.out_shortcut and not plain.decoder.in_shortcut
    # same parameters as the residual model (shortcuts are parameter-free), different function
    res = make_model(tiny_in_mix())
    plain.load_state_dict(res.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain.eval().encode(photos128), res.encode(photos128))


# ---------------------------------------------------------------------------------------------- diffusers
def _diffusers(cfg, model):
    from diffusers import AutoencoderDC

    kw = cfg.to_dict()
    for k in ("name", "residual_autoencoding"):
        kw.pop(k)
    kw["downsample_block_type"] = "pixel_unshuffle" if kw["downsample_block_type"] == "pixel_unshuffle" else "Conv"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoencoderDC(**kw).eval()
    missing, unexpected = ref.load_state_dict(ours_to_diffusers(model.state_dict()), strict=True)
    return ref


@pytest.mark.parametrize("cfg_fn,res", [(lambda: tiny_in_mix(), 128), (lambda: tiny_sana(), 128),
                                        (lambda: tiny_in_mix(latent=16, stages=5), 64)],  # 64/16=4x4 -> quadratic branch
                         ids=["in-mix-batchnorm", "sana-multiscale", "quadratic-branch"])
def test_equivalent_to_diffusers_on_real_photos(cfg_fn, res):
    from dcae_edge.data import sample_photos

    cfg = cfg_fn()
    model = make_model(cfg, seed=3)
    ref = _diffusers(cfg, model)
    x = sample_photos(res, 2)
    # float32 rounding relative to the values' scale: the same math in other op forms differs by a few ulps,
    # more on some CPUs (AVX2 Zen 3: 1.03e-5 on latents up to ~3); a wrong op is off by orders of magnitude more
    close = lambda a, b: (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())  # noqa: E731
    with torch.no_grad():
        z_ours, z_ref = model.encode(x), ref.encode(x).latent
        assert close(z_ours, z_ref), (z_ours - z_ref).abs().max()
        y_ours, y_ref = model.decode(z_ref), ref.decode(z_ref).sample
        assert close(y_ours, y_ref), (y_ours - y_ref).abs().max()
    if res == 64:  # the deepest attention stage really took the quadratic branch
        assert 64 // 2 ** (len(cfg.encoder_block_out_channels) - 1) ** 2 <= cfg.attention_head_dim


def test_diffusers_folder_loads_and_matches(tmp_path, photos128):
    cfg = tiny_in_mix()
    model = make_model(cfg, seed=5)
    ref = _diffusers(cfg, model)
    ref.save_pretrained(tmp_path / "diffusers")
    loaded = load_autoencoder(tmp_path / "diffusers")
    with torch.no_grad():
        assert torch.allclose(loaded.encode(photos128), ref.encode(photos128).latent, atol=1e-5)
    save_diffusers(model, tmp_path / "ours-as-diffusers")  # our writer produces a folder diffusers reads
    from diffusers import AutoencoderDC

    back = AutoencoderDC.from_pretrained(tmp_path / "ours-as-diffusers")
    with torch.no_grad():
        assert torch.allclose(back.encode(photos128).latent, model.encode(photos128), atol=1e-5)


def test_efficientvit_folder_loads(tmp_path, photos128):
    from safetensors.torch import save_file

    cfg = get_config("dc-ae-f32c32-in-1.0")
    small = tiny_in_mix()
    model = make_model(small, seed=7)
    folder = tmp_path / "dc-ae-tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_name": "tiny"}))
    save_file(ours_to_efficientvit(model.state_dict(), small), folder / "model.safetensors")
    # model_name selects the architecture: an unknown name is a clear error ...
    with pytest.raises(CheckpointError, match="not a published DC-AE"):
        load_autoencoder(folder)
    # ... and the key conversion reproduces our tree exactly
    state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(folder / "model.safetensors")
    converted = efficientvit_to_ours(state, model)
    assert set(converted) == set(model.state_dict())
    assert cfg.name == "dc-ae-f32c32-in-1.0"


def test_our_checkpoint_round_trip_fp16_and_fp32(tmp_path, photos128):
    model = make_model(tiny_sana(), seed=2)
    save_autoencoder(model, tmp_path / "m.safetensors")
    back = load_autoencoder(tmp_path / "m.safetensors")
    assert back.config == model.config
    with torch.no_grad():
        assert torch.equal(back.encode(photos128), model.encode(photos128))
    save_autoencoder(model, tmp_path / "h.safetensors", dtype=torch.float16)
    half = load_autoencoder(tmp_path / "h.safetensors")
    assert next(half.parameters()).dtype == torch.float32  # fp16 storage, fp32 compute
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (tmp_path / "m.safetensors").stat().st_size


def test_loading_builds_no_random_init_and_leaves_no_meta_tensor(tmp_path, photos128, monkeypatch):
    """Checkpoints load into a storage-less skeleton: no random init the weights overwrite (10 s and a
    second weight copy at paper size), every tensor real and trainable afterwards."""
    model = make_model(tiny_sana(), seed=4)
    save_autoencoder(model, tmp_path / "m.safetensors")
    inits = []
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: inits.append(t) or t)
    back = load_autoencoder(tmp_path / "m.safetensors")
    assert inits and all(t.is_meta for t in inits)  # init ran on storage-less tensors only: no work
    assert not any(t.is_meta for t in list(back.parameters()) + list(back.buffers()))
    assert all(p.requires_grad for p in back.parameters())
    with torch.no_grad():
        assert torch.equal(back.decode(back.encode(photos128)), model.decode(model.encode(photos128)))


def test_skeleton_load_fills_optional_buffers_the_checkpoint_lacks():
    """efficientvit files carry no BatchNorm num_batches_tracked: a storage-less model gets a real zero."""
    from dcae_edge.checkpoints import load_state_dict_strict

    src = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    load_state_dict_strict(model, state, "test")
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model[1].num_batches_tracked.item() == 0 and torch.equal(model[0].weight, src[0].weight)


def test_bundled_weights_load_when_present():
    from dcae_edge.checkpoints import bundled_weights_path

    if bundled_weights_path("f64") is None:
        pytest.skip("no bundled f64 weights in this checkout")
    model = load_autoencoder("f64")
    assert model.config.latent_channels == 128 and model.spatial_compression == 64
    assert 0 < model.scaling_factor < 10


@pytest.mark.parametrize("variant", ["f64", "f32"])
def test_bundled_autoencoder_beats_the_thumbnail_baseline(variant):
    """The bundled f64 and f32 are worth their latent on the 4 packaged photos (none of them in their training
    set): higher PSNR than bicubic upsampling of a thumbnail holding as many values, at 256² and
    512², by the margin recorded in the file when it was installed (scripts/bundle_decoder_update.py).
    Catches a silently broken weight file too (e.g. fp16-overflowed BatchNorm statistics)."""
    from safetensors import safe_open

    from dcae_edge.checkpoints import bundled_weights_path
    from dcae_edge.data import sample_photos
    from dcae_edge.evaluate import evaluate

    path = bundled_weights_path(variant)
    if path is None:
        pytest.skip(f"no bundled {variant} weights in this checkout")
    with safe_open(str(path), "pt") as f:
        recorded = json.loads(f.metadata().get("packaged_photos_margin_db", "{}"))
    model = load_autoencoder(variant)
    for res in (256, 512):
        r = evaluate(model, sample_photos(res))
        margin = r["psnr"] - r["baseline_psnr"]
        assert margin > 0, (res, r)
        if str(res) in recorded:  # float summation order differs across CPUs and thread counts: 0.01 dB slack
            assert margin >= recorded[str(res)] - 0.01, (res, margin, recorded)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("x,match", [
    (torch.full((1, 3, 64, 64), 3.0), r"\[-1, 1\]"),
    (torch.zeros(3, 64, 64), "4-D"),
    (torch.zeros(1, 4, 64, 64), "3 channels"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float"),
    (torch.zeros(1, 3, 60, 64), "multiples of the compression factor 8"),
    (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
])
def test_bad_images_are_refused_clearly(x, match):
    model = make_model(tiny_in_mix())
    with pytest.raises((ValueError, TypeError), match=match):
        model.encode(x)


def test_bad_latents_are_refused():
    model = make_model(tiny_in_mix(latent=16))
    with pytest.raises(ValueError, match="16 channels"):
        model.decode(torch.zeros(1, 8, 4, 4))


def test_folder_of_neither_layout(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="neither a diffusers"):
        load_autoencoder(tmp_path)


def test_truncated_safetensors(tmp_path):
    save_autoencoder(make_model(tiny_sana()), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_autoencoder(tmp_path / "m.safetensors")


def test_missing_and_misshaped_keys_are_listed(tmp_path):
    from safetensors.torch import save_file

    model = make_model(tiny_in_mix())
    ref = _diffusers(tiny_in_mix(), model)
    ref.save_pretrained(tmp_path)
    state = ours_to_diffusers(model.state_dict())
    state.pop("decoder.conv_in.weight")
    state["encoder.conv_out.bias"] = torch.zeros(3)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_autoencoder(tmp_path)
    msg = str(e.value)
    assert "missing keys (1)" in msg and "decoder.conv_in.weight" in msg
    assert "mis-shaped keys (1)" in msg and "encoder.conv_out.bias" in msg


def test_pickles_are_refused(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"not even a pickle")
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused"):
        load_autoencoder(p)


def test_hub_id_offline_says_what_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Download https://huggingface.co/mit-han-lab/dc-ae-f64c128-in-1.0"):
        load_autoencoder("mit-han-lab/dc-ae-f64c128-in-1.0")


def test_unknown_variant_lists_known_ones():
    with pytest.raises(KeyError, match="dc-ae-f64c128-in-1.0"):
        get_config("f65")


def test_conversion_round_trip_is_exact():
    model = make_model(tiny_sana())
    state = model.state_dict()
    back = diffusers_to_ours(ours_to_diffusers(state))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_fp16_storage_keeps_batchnorm_statistics_exact(tmp_path, photos128):
    """A BatchNorm running variance above 65504 would be inf in fp16: buffers stay fp32."""
    model = make_model(tiny_in_mix(), seed=1)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var.fill_(1.5e5)
    save_autoencoder(model, tmp_path / "h.safetensors", dtype=torch.float16)
    back = load_autoencoder(tmp_path / "h.safetensors")
    back_bn = next(m for m in back.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(back_bn.running_var, bn.running_var)
    with torch.no_grad():
        assert torch.isfinite(back.decode(model.encode(photos128))).all()


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import save_file

    model = make_model(tiny_sana())
    save_autoencoder(model, tmp_path / "m.safetensors")
    tensors, meta = __import__("dcae_edge.checkpoints", fromlist=["read_safetensors"]).read_safetensors(tmp_path / "m.safetensors")
    tensors["decoder.norm_out.weight"][0] = float("inf")
    save_file(tensors, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match="non-finite values .* decoder.norm_out.weight"):
        load_autoencoder(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="refusing to save"):
        bad = load_autoencoder(tmp_path / "m.safetensors")
        with torch.no_grad():
            bad.decoder.norm_out.weight[0] = float("nan")
        save_autoencoder(bad, tmp_path / "x.safetensors")
