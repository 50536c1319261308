"""cigl's CPU inference engine for sparse models: convolutions and linear layers computed from
the nonzero weights only, so a 90%-sparse layer does a tenth of the multiply-adds.

    engine = SparseEngine(open("model.onnx", "rb").read())
    logits, probs = engine.run(images)          # float32 NCHW, normalised

It reads the exported model.onnx (packed weights stay packed: no dense copy of a sparse layer is
made), runs on numba kernels (the `sparse` extra: pip install 'cigl[sparse]'), and raises
Unsupported for graphs it does not cover; cigl.serve.engines then falls back to onnxruntime.
Layout: layout.py; kernels: kernels.py (one row at a time) and quads.py (four rows of a denser
layer at a time); graph reading and fusion: graph.py.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from cigl.errors import FormatError, InputError
from cigl.serve.engines import check_input, static_size
from cigl.serve.sparse_engine.graph import Unsupported

__all__ = ["SparseEngine", "Unsupported", "missing"]

# a run of fewer multiply-adds than SERIAL_MACS (about 1.3 ms on one core, run cold) runs on one
# thread when the thread count is the engine's choice, unless the last run on several threads in
# this process ended less than IDLE seconds ago. numba's worker thread spins for 10-50 ms after a
# run, then sleeps, and waking it costs more than a small run saves: on a 2-core Zen 5 VM a batch-1
# WRN-22-2 at density 0.1 (27 million multiply-adds) on two threads took 0.5 ms back to back, 0.6
# ms 10 ms after the last run, 0.7-12.7 ms 20 ms after and 11 ms 100 ms after (one thread: 1.3 ms
# 100 ms after). While the worker spins two threads won every run, from 3.7 million multiply-adds
# up (1.26-1.94x, back to back). SERIAL_MACS was measured on a Zen 4 VM, in turn with dense
# onnxruntime, 0.2 s apart: one thread won at 3.7 and 13.9 million (WRN-22-2 at density 0.05, batch
# 1: 1.50 ms against 1.82), 7.5 million was a draw, two won at 15.1, 22.6 and 27.4 million.
SERIAL_MACS = 14_000_000
IDLE = 0.01
_parallel_end = -float("inf")  # perf_counter when this process's last run on several threads ended
_SHAPES = 16  # input sizes whose multiply-adds an engine remembers


def missing() -> str | None:
    """None when the engine can run here, else why not."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return "the sparse engine needs numba: pip install 'cigl[sparse]'"
    return None


def _dims(value_info) -> list:
    """A graph input's or output's shape as onnxruntime reports it (ints, names or None)."""
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


class SparseEngine:
    """The engine's program for one serialised ONNX model. `metadata`, `inputs` and `outputs`
    (name -> shape) describe the graph as onnxruntime would; runs are serialised by a lock.

    `threads` 0 (the default) uses every core, except for a run of fewer than SERIAL_MACS
    multiply-adds (a batch-1 ResNet-20 at 90% sparsity, or a WRN-22-2 at 95%) while numba's
    worker thread sleeps (no run on several threads in the last IDLE seconds), which runs on
    one: on 2-core VMs waking the worker took 0.4 ms to over 10 ms, more than such a run takes
    alone. Within a run the calls follow each other with no Python between them, so the worker
    woken for the first stays awake.

    A graph whose image size is fixed runs once on a batch of 1 at load: a graph the reader took
    but cannot run raises Unsupported there (the engines fall back to onnxruntime), not at a
    server's first request, and that run counts the multiply-adds per image. With the size left
    open, such a fault shows at run time, as InputError, and the count is made on the first run
    at each input size (that run uses every core)."""

    name = "sparse"

    def __init__(self, model: bytes, *, source: str = "model", threads: int = 0):
        import onnx
        from google.protobuf.message import DecodeError

        from cigl.serve.session import check_threads
        from cigl.serve.sparse_engine.graph import Program

        check_threads(threads)

        try:
            proto = onnx.load_from_string(model)
            onnx.checker.check_model(proto)
        except (DecodeError, onnx.checker.ValidationError, ValueError) as exc:
            raise FormatError(f"{source} is not a loadable ONNX model ({str(exc).splitlines()[0][:200]})") from None
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
            raise FormatError(f"{source} keeps weights in external data files; cigl serves single-file ONNX only")
        self.metadata = {p.key: p.value for p in proto.metadata_props}
        self.inputs = {i.name: _dims(i) for i in proto.graph.input}
        self.outputs = {o.name: _dims(o) for o in proto.graph.output}
        self.program = Program(proto)
        self.threads = threads
        self._macs: dict[tuple[int, ...], int] = {}  # per image, by input size (C, H, W)
        self._lock = threading.Lock()  # numba's workqueue threading layer is not re-entrant
        size = static_size(self.inputs)
        if size is not None:  # a graph fault shows here (Unsupported), not at the first request
            self._counted_run(np.zeros((1, *size), np.float32))

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probs) of a float32 NCHW batch (InputError on a shape the graph does not take)."""
        global _parallel_end  # numba's worker threads are the process's, not an engine's
        check_input(images, self.inputs)
        with self._lock:
            import numba

            size = tuple(images.shape[1:])
            macs, cores = self._macs.get(size), numba.config.NUMBA_NUM_THREADS
            asleep = time.perf_counter() - _parallel_end > IDLE
            if self.threads:
                threads = min(self.threads, cores)
            elif asleep and macs is not None and macs * len(images) < SERIAL_MACS:
                threads = 1
            else:
                threads = cores
            # numba's thread count is global: set it on every run, or another engine's would stay
            numba.set_num_threads(threads)
            try:
                out = self._counted_run(images)
            except Unsupported as exc:  # a size the graph's sizes were not open to
                raise InputError(f"the sparse engine cannot run inputs of shape {images.shape}: {exc}") from None
            if threads > 1:
                _parallel_end = time.perf_counter()
        return out["logits"], out["probs"]

    def _counted_run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The program's outputs for `images`; the first run at an input size (of up to _SHAPES
        sizes) is traced, to count its multiply-adds per image for the thread rule."""
        size = tuple(images.shape[1:])
        trace = [] if size not in self._macs and len(self._macs) < _SHAPES else None
        out = self.program.run(images, trace)
        if trace is not None:
            self._macs[size] = sum(self.program.macs_per_image(trace))
        return out

    @property
    def density(self) -> float:
        """Nonzeros / elements over the convolution and linear weights."""
        return self.program.density

    @property
    def nbytes(self) -> int:
        """Bytes held for the convolution and linear layers: nonzeros, biases, kernel tables."""
        return sum(s.layer.nbytes for s in self.program.steps if s.layer is not None)

    def profile(self, images: np.ndarray) -> list[dict]:
        """Per step: kind (with fused ops), node name, best seconds of 3 runs, multiply-adds per image."""
        with self._lock:
            return self.program.profile(images)
