"""What an app loads: one numpy API over onnxruntime, OpenVINO and Core ML (torch as reference).

    from runtimes import open_bundle, load_image, to_pil
    pipe = open_bundle("exports/f64")
    recon = pipe.reconstruct(load_image("photo.jpg", size=512))

This package never imports torch unless backend="torch" is asked for.
"""
from .backends import BACKENDS, RuntimeUnavailable
from .images import as_model_input, load_image, save_grid, to_pil, to_uint8
from .pipeline import BundleError, Pipeline, open_bundle, read_manifest

__all__ = ["open_bundle", "Pipeline", "BundleError", "RuntimeUnavailable", "BACKENDS", "load_image", "to_pil",
           "to_uint8", "save_grid", "as_model_input", "read_manifest"]
