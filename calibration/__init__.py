"""INT8 calibration of a bundle's graphs for ONNX Runtime, OpenVINO and Core ML, from real data,
behind quality gates.

    python -m calibration --bundle exports/f64 --backend onnxruntime
    python -m calibration --bundle exports/f64 --backend openvino --max-drop 0.3
    python -m calibration --bundle exports/f64 --backend coreml --palettize 6

Modules: ``data`` (calibration / held-out sets per graph, cached, checked against the graph's
signature), ``quality`` (gates and metrics, all through ``dcae_edge.compare``), ``sensitivity``
(which nodes stay in float), one module per backend, ``report`` (JSON / Markdown / PNG) and
``__main__`` (the command, which writes the bundle only after every gate passed).
"""


class CalibrationError(RuntimeError):
    """Calibration refused or impossible; the message says what to do. The bundle is untouched."""


class GateFailed(CalibrationError):
    """A quantized graph misses its quality gate even with every sensitive node kept in float."""
