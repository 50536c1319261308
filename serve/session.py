"""The one place an onnxruntime session is made: export's parity check and the Predictor.

Idle worker threads never spin (on 2 cores a spinning pool steals a core from whatever runs
next), warnings stay quiet, and a model is read from bytes, so a file that keeps its weights
in external data cannot make onnxruntime open other paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cigl.errors import FormatError, InputError, is_int_in

DEVICES = ("auto", "cpu", "cuda")


def _gpu_present() -> bool:
    """An NVIDIA driver is loaded (Linux); elsewhere onnxruntime's own check has to do."""
    return Path("/proc/driver/nvidia/version").exists() or not sys.platform.startswith("linux")


def providers(device: str) -> list[str]:
    """onnxruntime execution providers for `device` ("auto", "cpu" or "cuda")."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise InputError(f"device must be auto, cpu or cuda, got {device!r}")
    # onnxruntime-gpu lists CUDAExecutionProvider even on machines without a GPU, then logs
    # errors while falling back to CPU: only ask for CUDA where a GPU can be there
    cuda_ok = "CUDAExecutionProvider" in ort.get_available_providers() and _gpu_present()
    if device == "cuda" and not cuda_ok:
        raise InputError("device cuda requested but no usable CUDA GPU / CUDAExecutionProvider here; use --device cpu")
    if device == "cpu" or not cuda_ok:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def add_device_option(parser) -> None:
    """--device of the serving tools."""
    parser.add_argument(
        "--device", choices=DEVICES, default="auto", help="onnxruntime device (default auto: CUDA if usable)"
    )


MAX_THREADS = 1024


def check_threads(threads) -> None:
    """InputError unless `threads` is an integer in 0..MAX_THREADS (0: the engine's choice, all
    cores); a huge count would make onnxruntime start that many threads."""
    if not is_int_in(threads, 0, MAX_THREADS):
        raise InputError(f"threads must be an integer from 0 (all cores) to {MAX_THREADS}, got {threads!r}")


def open_session(model: bytes, *, device: str = "cpu", threads: int = 0, source: str = "model"):
    """An onnxruntime InferenceSession of the serialised ONNX `model` (threads 0 = onnxruntime's
    choice). A model onnxruntime cannot load is a FormatError naming `source`."""
    import onnxruntime as ort

    check_threads(threads)

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    chosen = providers(device)
    try:
        session = ort.InferenceSession(model, opts, providers=chosen)
    except Exception as exc:  # onnxruntime raises its own exception types
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "external" in message.lower():
            raise FormatError(
                f"{source} keeps weights in external data files; cigl serves single-file ONNX only"
            ) from None
        raise FormatError(f"{source} is not a loadable ONNX model ({message[:200]})") from None
    if device == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise InputError(f"device cuda requested but onnxruntime fell back to {session.get_providers()[0]}")
    return session
