"""The inference engines behind the Predictor, and `--engine auto|onnxruntime|sparse`.

Every engine has `name`, `metadata` (the model card entries), `inputs` / `outputs` (name ->
shape) and `run(x) -> (logits, probs)`, which raises InputError for an input of a shape the
graph does not take (`check_input`). `auto` on the CPU times both engines once at load, in
turn, on a batch of 1 (each run AUTO_PAUSE after the last, as lone requests arrive) and a batch of
AUTO_BATCH zeros (compute does not depend on the values), and then runs each batch on the engine
picked for the nearer of those sizes: the sparse engine when it took under AUTO_MARGIN of
onnxruntime's time (a stricter share at batch 1), onnxruntime otherwise (ties go to
onnxruntime, so auto is not slower than it). An engine picked for neither size is dropped, so a
model served by the sparse engine alone holds no dense weights. Weights denser than
AUTO_MAX_DENSITY overall (by the model card's actual_density when it has one, before the sparse
engine reads anything) keep onnxruntime without timing, and so does a graph the sparse engine
does not run, quietly: only `--engine sparse` warns about that, naming the operator. Before
timing, auto runs both engines on a seeded random batch: a sparse engine that raises or whose
outputs differ from onnxruntime's by more than PARITY is dropped with a one-line warning.
"""

from __future__ import annotations

import statistics
import time
import warnings

import numpy as np

from cigl.errors import InputError
from cigl.serve.session import open_session

ENGINES = ("auto", "onnxruntime", "sparse")
AUTO_BATCH = 16  # the large batch auto times; batches of SMALL_BATCH or fewer follow the batch-1 timing
SMALL_BATCH = 4
AUTO_MAX_DENSITY = 0.5  # denser weights than this cannot win: auto keeps onnxruntime without timing
# the share of onnxruntime's time the sparse engine must take at most to be picked, at AUTO_BATCH and
# at batch 1: single runs vary by +-15% with the gap before them (the benchmark's batch-1 passes), so
# batch 1 asks for a clear win: at 0.95, batch-1 WRN-22-2 at density 0.1 was picked and ran 0.92x
AUTO_MARGIN = (0.95, 0.8)
AUTO_ROUNDS = (3, 9)  # timed rounds at AUTO_BATCH and at batch 1 (milliseconds each: noise needs more)
# seconds before each timed batch-1 run (time_in_turn's gap): a lone request, the worst case for
# the sparse engine, so that a pick made here also holds back to back. After a gap its caches are
# cold, which slowed it (1.7x) more than onnxruntime (1.2x), and numba's worker thread, which spins
# for 10-50 ms after a run, has gone to sleep: waking it took up to 11 ms on a 2-core Zen 5 VM
# (WRN-22-2 at density 0.1, batch 1, on two threads: 0.5 ms back to back, 0.6 ms 10 ms after the
# last run, 0.7-12.7 ms 20 ms after, 11 ms 100 ms after). At 20 ms auto picked the sparse engine
# for that model, which then ran lone requests at 0.12x onnxruntime's speed.
AUTO_PAUSE = 0.1
# auto's check at load: the sparse engine's logits within this share of their scale of onnxruntime's
# and its probabilities within this of onnxruntime's (the parity bar; measured models agree
# to a few 1e-6), on a seeded random batch
PARITY = 1e-4


def check_input(x: np.ndarray, inputs: dict[str, list]) -> None:
    """InputError unless `x` has the graph input's rank, every size it fixes and at least one
    image: onnxruntime's own error is a multi-line traceback message, and the sparse engine's
    kernels index planes without bounds checks (fewer channels than the first convolution
    reads would send it past its buffer)."""
    dims = [d if isinstance(d, int) and d > 0 else None for d in next(iter(inputs.values()), [])]
    if x.ndim != len(dims) or any(d is not None and d != n for d, n in zip(dims, x.shape, strict=True)):
        want = ", ".join("N" if i == 0 and d is None else "any" if d is None else str(d) for i, d in enumerate(dims))
        raise InputError(f"the model takes inputs of shape ({want}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise InputError("empty batch: pass at least one image")


def static_size(inputs: dict[str, list]) -> tuple[int, ...] | None:
    """The (C, H, W) every image of the graph's input must have, or None where any is left open."""
    size = next(iter(inputs.values()), [])[1:]
    return tuple(size) if len(size) == 3 and all(isinstance(d, int) and d > 0 for d in size) else None


class OnnxRuntime:
    """An onnxruntime session (thread-safe) as an engine."""

    def __init__(self, model: bytes, *, device: str, threads: int, source: str):
        self.session = open_session(model, device=device, threads=threads, source=source)
        self.name = self.session.get_providers()[0]
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.outputs = {o.name: o.shape for o in self.session.get_outputs()}

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        check_input(x, self.inputs)
        logits, probs = self.session.run(["logits", "probs"], {"images": x})
        return logits, probs


def add_engine_option(parser) -> None:
    """--engine of the serving tools."""
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="inference engine (default auto: on the CPU, whichever of onnxruntime and cigl's sparse engine "
        "is faster for this model, timed once at load; sparse needs pip install 'cigl[sparse]')",
    )


# seconds every engine idles before its runs in time_in_turn: the sparse engine's worker threads
# spin for a few milliseconds after a run, and a run of onnxruntime in that time lost a core to
# them (batch-1 ResNet-18 at density 0.1, dense onnxruntime: 3.6-4.0 ms after its own run, 6.1
# ms 0-5 ms after a sparse engine's, 4.1 ms 20 ms after it)
SETTLE = 0.02


def time_in_turn(engines: dict, x: np.ndarray, rounds: int, gap: float = 0.0) -> dict[str, float]:
    """Median seconds per engine of running `x`, over `rounds` rounds in which each engine runs
    in turn (after one warm-up run each), in a fresh seeded order each round: a drift in the
    machine's speed reaches all alike.

    Each timed run follows a run of its own engine, `gap` seconds before it (0: back to back,
    as in a busy server; a pause: a lone request, whose caches the gap left cold), as a server
    running one engine sees it; and it comes at least SETTLE seconds after the engine before it
    in the round, whose threads, still spinning, would take a core from it."""
    names = list(engines)
    for engine in engines.values():
        engine.run(x)  # allocations, onnxruntime's first-run planning, kernel compilation
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    shuffle = np.random.default_rng(0)
    for _ in range(rounds):
        for name in (names[i] for i in shuffle.permutation(len(names))):
            if gap < SETTLE:
                time.sleep(SETTLE - gap)
            engines[name].run(x)  # not timed: wakes its threads, brings its data back
            if gap:
                time.sleep(gap)
            start = time.perf_counter()
            engines[name].run(x)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in seconds.items()}


class Auto:
    """Both engines; each batch runs on the one measured faster at the nearer timed size."""

    def __init__(self, ort: OnnxRuntime, sparse, input_size: tuple[int, ...], max_batch: int):
        self.metadata, self.inputs, self.outputs = ort.metadata, ort.inputs, ort.outputs
        engines = {"onnxruntime": ort, "sparse": sparse}
        self.seconds: dict[int, dict[str, float]] = {}
        for batch in sorted({1, min(AUTO_BATCH, max_batch)}):
            x = np.zeros((batch, *input_size), np.float32)
            self.seconds[batch] = time_in_turn(engines, x, AUTO_ROUNDS[batch == 1], AUTO_PAUSE * (batch == 1))
        fastest = {
            batch: "sparse" if t["sparse"] < AUTO_MARGIN[batch == 1] * t["onnxruntime"] else "onnxruntime"
            for batch, t in self.seconds.items()
        }
        self.small, self.large = fastest[1], fastest[max(fastest)]
        self.engines = {name: e for name, e in engines.items() if name in (self.small, self.large)}
        label = {"onnxruntime": ort.name, "sparse": "sparse"}
        self.name = (
            f"auto: {label[self.small]}"
            if self.small == self.large
            else f"auto: {label[self.small]} for batches <= {SMALL_BATCH}, {label[self.large]} above"
        )

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.engines[self.small if len(x) <= SMALL_BATCH else self.large].run(x)


def _sparse_or_none(model: bytes, source: str, asked: bool, threads: int = 0):
    """The sparse engine for `model`, or None when it cannot run it. Asked for by name
    (`asked`), numba missing is an error and a graph it does not run a one-line warning naming
    the operator; for auto, which only tries it, both just leave onnxruntime (`--engine sparse`
    says why)."""
    from cigl.serve import sparse_engine

    why = sparse_engine.missing()
    if why is not None:
        if asked:
            raise InputError(why)
        return None
    try:
        return sparse_engine.SparseEngine(model, source=source, threads=threads)
    except sparse_engine.Unsupported as exc:
        if asked:
            warnings.warn(f"sparse engine: {source} uses {exc}, which it does not run; using onnxruntime", stacklevel=2)
        return None


def _disagreement(ort: OnnxRuntime, sparse, input_size: tuple[int, ...], source: str) -> str | None:
    """Why auto must not use the sparse engine for this model, or None: on a seeded random batch
    of 2 it raised, or its outputs differ from onnxruntime's by more than PARITY. A graph the
    engine reads but gets wrong then costs speed, never a wrong answer."""
    x = np.random.default_rng(0).standard_normal((2, *input_size)).astype(np.float32)
    try:
        logits, probs = sparse.run(x)
    except Exception as exc:  # auto only tries the engine: any failure leaves onnxruntime
        return f"it failed on {source} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]})"
    ref_logits, ref_probs = ort.run(x)
    if logits.shape != ref_logits.shape or probs.shape != ref_probs.shape:
        return f"its outputs on {source} have shapes {logits.shape} and {probs.shape}, onnxruntime's {ref_logits.shape}"
    gap = float(np.abs(logits - ref_logits).max()) / max(float(np.abs(ref_logits).max()), np.finfo(np.float32).tiny)
    if not (gap <= PARITY and float(np.abs(probs - ref_probs).max()) <= PARITY):  # NaN disagrees too
        return f"its outputs on {source} differ from onnxruntime's (max |logits diff| {gap:.1e} of their scale)"
    return None


def _dense_card(metadata: dict[str, str]) -> bool:
    """The model card says the weights are denser than auto could ever pay for (a dense run, or a
    low sparsity): auto skips reading them as nonzeros at all."""
    try:
        return float(metadata.get("actual_density", "nan")) > AUTO_MAX_DENSITY
    except ValueError:
        return False


def open_engine(
    model: bytes,
    *,
    engine: str = "auto",
    device: str = "auto",
    threads: int = 0,
    source: str = "model",
    max_batch: int = 1024,
):
    """The engine `engine` names for the serialised ONNX `model` (see the module docstring)."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "sparse" and device == "cuda":
        raise InputError("the sparse engine runs on the CPU; use --device cpu or --engine onnxruntime")
    if engine == "sparse":
        sparse = _sparse_or_none(model, source, asked=True, threads=threads)
        if sparse is not None:
            return sparse
    ort = OnnxRuntime(model, device=device, threads=threads, source=source)
    size = static_size(ort.inputs)  # None: nothing to time on
    if engine != "auto" or ort.name != "CPUExecutionProvider" or _dense_card(ort.metadata) or size is None:
        return ort  # asked for, the sparse engine unable to run the model, a GPU, dense weights, no size
    sparse = _sparse_or_none(model, source, asked=False, threads=threads)
    if sparse is None or sparse.density > AUTO_MAX_DENSITY:
        return ort
    why = _disagreement(ort, sparse, size, source)
    if why is not None:
        warnings.warn(f"sparse engine: {why}; using onnxruntime", stacklevel=2)
        return ort
    return Auto(ort, sparse, size, max_batch)
