"""An app's install: the package without extras in a fresh virtual environment (numpy, Pillow,
onnxruntime, safetensors; no torch), opening a bundle made by the full toolchain and running
reconstruct and generate through the CLIs, with torch not importable."""
from __future__ import annotations

import os
import subprocess
import sys
import venv

import pytest

from conftest import ROOT, make_model, tiny_denoiser, tiny_edge_f64


@pytest.mark.slow
def test_base_install_runs_the_app_without_torch(tmp_path):
    from dcae_edge.checkpoints import latent_fingerprint, save_autoencoder
    from dcae_edge.denoiser import save_denoiser
    from export.onnx import main

    ae = make_model(tiny_edge_f64(), seed=6)
    save_autoencoder(ae, tmp_path / "ae.safetensors")
    save_denoiser(tiny_denoiser(input_size=2, num_classes=3), tmp_path / "dn.safetensors",
                  extra={"latent_fingerprint": latent_fingerprint(ae), "class_names": ["x", "y", "z"]})
    main(["--weights", str(tmp_path / "ae.safetensors"), "--denoiser", str(tmp_path / "dn.safetensors"),
          "--resolution", "128", "--out", str(tmp_path / "bundle")])

    env_dir = tmp_path / "app-env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # the project without extras (what `pip install dcae-edge` gives an app), built from a copy of the
    # sources so setuptools' build/ folder never lands in the working tree
    import shutil

    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "node_modules", ".venv", ".ci-venv", "data", "runs",
                                                             "exports", "build", ".cache", "docs", "tests", "*.egg-info"))
    r = subprocess.run([py, "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, env=env, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([py, "-c", "import torch"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    photo = ROOT / "dcae_edge" / "assets" / "coffee.jpg"
    for cmd in (["-m", "runtimes.reconstruct", "--bundle", str(tmp_path / "bundle"), str(photo), "--out", str(tmp_path / "rec.png")],
                ["-m", "runtimes.generate", "--bundle", str(tmp_path / "bundle"), "--classes", "x", "2", "--out",
                 str(tmp_path / "gen.png")],
                ["-m", "export.onnx", "--help"], ["-m", "runtimes.web", "--help"]):
        r = subprocess.run([py, *cmd], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
    assert (tmp_path / "rec.png").stat().st_size > 1000 and (tmp_path / "gen.png").stat().st_size > 1000
    # the toolchain itself says which extra it needs
    r = subprocess.run([py, "-m", "export.onnx", "--variant", "f64", "--out", str(tmp_path / "x")], capture_output=True,
                       text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "pip install 'dcae-edge[export]'" in r.stderr, r.stderr[-2000:]
    assert sys.executable != py
