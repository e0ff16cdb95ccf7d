"""Three-phase AE training: trainable sets, exact resume, DDP replicas, data splits, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, tiny_in_mix
from dcae_edge import train as T
from dcae_edge.data import ImageFolder, step_generator


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """A tiny image folder of the bundled real photos, in two class sub-folders."""
    d = tmp_path_factory.mktemp("photos")
    for i, p in enumerate(sorted((ROOT / "dcae_edge" / "assets").glob("*.jpg"))):
        (d / f"class{i % 2}").mkdir(exist_ok=True)
        shutil.copy(p, d / f"class{i % 2}" / p.name)
    return d


@pytest.fixture(scope="module")
def arch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(tiny_in_mix(latent=16).to_dict()))
    return path


def run(arch_file, photo_dir, out, phase, steps, **kw):
    args = ["--model", str(arch_file), "--data", str(photo_dir), "--eval-data", str(photo_dir), "--out", str(out),
            "--phase", str(phase), "--steps", str(steps), "--batch-size", "2", "--amp", "fp32", "--device", "cpu",
            "--ckpt-every", "2", "--log-every", "1", "--warmup", "2", "--lr", "1e-3"]
    if phase == 2:
        kw.setdefault("resolution", 128)
    kw.setdefault("resolution", 64)
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return T.train(T.parse_args(args))


def changed_keys(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_phases_train_only_their_layers(tmp_path, arch_file, photo_dir):
    run(arch_file, photo_dir, tmp_path, 1, 3)
    run(arch_file, photo_dir, tmp_path, 2, 3)
    run(arch_file, photo_dir, tmp_path, 3, 3)
    w = {p: load_file(tmp_path / f"phase{p}" / "model.safetensors") for p in (1, 2, 3)}
    from dcae_edge.checkpoints import _load_ours

    model = _load_ours(tmp_path / "phase1" / "model.safetensors")
    for phase in (2, 3):
        prefixes = T.trainable_prefixes(model, phase)
        changed = changed_keys(w[phase - 1], w[phase])
        assert changed, f"phase {phase} changed nothing"
        outside = {k for k in changed if not any(k.startswith(p) for p in prefixes)}
        assert not outside, f"phase {phase} changed frozen tensors: {sorted(outside)[:5]}"
    # phase 2 = latent interface; phase 3 = decoder head, which includes a BatchNorm stage whose
    # running stats may move only because that stage is trainable
    assert any(k.startswith("encoder.conv_out") for k in changed_keys(w[1], w[2]))
    assert not any(k.startswith("encoder.") for k in changed_keys(w[2], w[3]))
    # phase 3 leaves the encoder alone: same latent space (a denoiser stays valid), same scaling factor
    from dcae_edge.checkpoints import latent_fingerprint, model_fingerprint

    m2, m3 = (_load_ours(tmp_path / f"phase{p}" / "model.safetensors") for p in (2, 3))
    assert latent_fingerprint(m2) == latent_fingerprint(m3) and model_fingerprint(m2) != model_fingerprint(m3)
    assert m2.scaling_factor == m3.scaling_factor
    summary = json.loads((tmp_path / "phase3" / "summary.json").read_text())
    assert summary["perceptual"] in ("ms-ssim", "lpips") and summary["scaling_factor"] > 0
    for f in ("loss.png", "recon.png"):
        assert (tmp_path / "phase3" / f).stat().st_size > 1000


def test_decoder_only_continuation_keeps_the_latent_space(tmp_path, arch_file, photo_dir):
    """A phase-3 head spanning every decoder stage trains the whole decoder (conv_in included) and
    nothing else; gan weight 0 builds no discriminator; --pixel-loss mse is what is optimised."""
    from dcae_edge.checkpoints import _load_ours, latent_fingerprint

    run(arch_file, photo_dir, tmp_path, 1, 2)
    model = _load_ours(tmp_path / "phase1" / "model.safetensors")
    n_stages = sum(d > 0 for d in model.config.decoder_layers_per_block)
    summary = run(arch_file, photo_dir, tmp_path, 3, 3, head_stages=n_stages, gan_weight=0, perceptual="none",
                  pixel_loss="mse", init=tmp_path / "phase1" / "model.safetensors")
    changed = changed_keys(load_file(tmp_path / "phase1" / "model.safetensors"),
                           load_file(tmp_path / "phase3" / "model.safetensors"))
    assert any(k.startswith("decoder.conv_in.") for k in changed)
    assert changed and all(k.startswith("decoder.") for k in changed)
    assert latent_fingerprint(model) == latent_fingerprint(_load_ours(tmp_path / "phase3" / "model.safetensors"))
    ckpt = torch.load(tmp_path / "phase3" / "ckpt.pt", weights_only=False)
    assert "disc" not in ckpt
    assert summary["pixel_loss"] == "mse" and summary["gan_weight"] == 0 and summary["perceptual"] == "none"
    history = json.loads(ckpt["history"])
    assert "mse" in history[0] and "g" not in history[0]
    with pytest.raises(ValueError, match="--pixel-loss must be l1 or mse"):
        run(arch_file, photo_dir, tmp_path / "bad", 1, 1, pixel_loss="l2")


def test_resume_after_interruption_is_identical(tmp_path, arch_file, photo_dir):
    run(arch_file, photo_dir, tmp_path / "straight", 1, 4)
    run(arch_file, photo_dir, tmp_path / "resumed", 1, 2)  # "killed" after its step-2 checkpoint
    run(arch_file, photo_dir, tmp_path / "resumed", 1, 4)
    a = load_file(tmp_path / "straight" / "phase1" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "phase1" / "model.safetensors")
    assert set(a) == set(b) and not changed_keys(a, b)


def test_resume_from_another_configuration_is_refused(tmp_path, arch_file, photo_dir):
    run(arch_file, photo_dir, tmp_path, 1, 2)
    with pytest.raises(ValueError, match="belongs to another configuration.*batch_size"):
        run(arch_file, photo_dir, tmp_path, 1, 3, batch_size=3)


def test_phase_without_previous_phase_is_refused(tmp_path, arch_file, photo_dir):
    with pytest.raises(T.SetupError, match="run phase 1 first"):
        run(arch_file, photo_dir, tmp_path, 2, 1)


def test_runs_that_cannot_start_are_one_line_errors(tmp_path, arch_file, photo_dir, capsys):
    """The CLI: a missing data folder, an unknown schedule or model: "error: ..." (exit 1), no traceback, nothing written."""
    args = ["--model", str(arch_file), "--eval-data", str(photo_dir), "--out", str(tmp_path / "run"), "--steps", "1",
            "--resolution", "64", "--batch-size", "2", "--amp", "fp32", "--device", "cpu"]
    for extra, message in [(["--data", str(tmp_path / "missing")], "error: --data: image folder"),
                           (["--data", str(photo_dir), "--lr-schedule", "linear"], "error: --lr-schedule must be constant or cosine"),
                           (["--data", str(photo_dir), "--model", "f65"], "error: --model f65: unknown DC-AE variant")]:
        with pytest.raises(SystemExit) as e:
            T.main(args + extra)
        assert str(e.value).startswith(message), e.value
    assert not (tmp_path / "run" / "phase1" / "ckpt.pt").exists()


def test_phase_asking_for_missing_layers_is_refused(tmp_path, arch_file, photo_dir):
    run(arch_file, photo_dir, tmp_path, 1, 1)
    with pytest.raises(ValueError, match="exceeds the model"):
        run(arch_file, photo_dir, tmp_path, 2, 1, middle_stages=9)


def test_killed_write_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from dcae_edge.training_utils import atomic_torch_save, load_training_checkpoint

    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"step": 1}, path)

    def crash(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"step": 2}, path)
    monkeypatch.undo()
    assert load_training_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_ddp_two_gloo_processes_keep_replicas_identical(tmp_path, arch_file, photo_dir):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           "-m", "dcae_edge.train", "--model", str(arch_file), "--data", str(photo_dir), "--eval-data", str(photo_dir),
           "--out", str(tmp_path), "--phase", "1", "--steps", "3", "--batch-size", "2", "--resolution", "64",
           "--amp", "fp32", "--device", "cpu", "--log-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "phase1" / "ddp.json").read_text()) == {"world": 2, "replicas_identical": True}


# ---------------------------------------------------------------------------------------------- data
def test_image_folder_skips_unreadable_and_tiny_files(tmp_path, photo_dir):
    shutil.copytree(photo_dir / "class0", tmp_path / "a")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (20, 20)).save(tmp_path / "a" / "tiny.png")
    ds = ImageFolder(tmp_path, min_side=64)
    assert len(ds) == 2 and len(ds.skipped) == 2
    assert ds.classes == ["a"]
    crops, labels = ds.random_crops(3, 64, step_generator(0, 0))
    again, _ = ds.random_crops(3, 64, step_generator(0, 0))
    assert crops.shape == (3, 3, 64, 64) and torch.equal(crops, again)


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no usable images"):
        ImageFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="dcae_edge.photos"):
        ImageFolder(tmp_path / "missing")


def test_photo_split_is_by_whole_image(tmp_path, monkeypatch):
    from dcae_edge import photos

    # PyPI images only (no apt here); send scikit-image photos to train/calibration, sklearn to eval
    monkeypatch.setattr(photos, "EVAL_SOURCES", {"scikit-learn"})
    monkeypatch.setattr(photos, "CALIBRATION_EVERY", 2)
    m = photos.assemble(tmp_path / "set", debian=False)
    splits = {}
    for e in m["images"]:
        splits.setdefault(e["source_sha256_16"], set()).add(e["split"])
        assert (tmp_path / "set" / e["file"]).is_file() and e["licence"]
    assert all(len(s) == 1 for s in splits.values()), "a photo landed in two splits"
    assert m["counts"]["train"] and m["counts"]["calibration"] and m["counts"]["eval"]
