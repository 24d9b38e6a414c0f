"""Where latency is measured: the backend record, its checks, and how a model is placed on it.

One small record, :class:`Backend`, says everything a latency figure depends on (runtime,
device, dtype, batch, threads, timed passes) so that :func:`kcp_plugin.compare_latency`, the
latency target of :func:`kcp_plugin.prune`, the latency tables and the CLI all measure the same
thing, and every figure can name its hardware, backend, dtype and batch
(:meth:`Backend.describe`).

Three runtimes:

* ``"torch"``: eager PyTorch on the CPU (``threads`` intra-op threads), fp32 or bf16;
* ``"onnxruntime"``: the model exported to ONNX and run by an onnxruntime CPU session, fp32
  (``pip install kcp-plugin[deploy]``);
* ``"cuda"``: eager PyTorch on an NVIDIA GPU, fp32 / fp16 / bf16, channels-last for 4-D
  inputs by default, ``cudnn.benchmark`` on while measuring (restored after), timed with CUDA
  events around each pass (so launch overhead counts, as it does in deployment).

The timing source is injectable (:attr:`Backend.timer`): tests run the whole latency machinery
with a fake clock on a machine without a GPU, and nothing here needs a GPU to import.

Channel multiples (:meth:`Backend.channel_multiple`) are the widths each runtime's kernels
want: NVIDIA's convolution guide asks for multiples of 8 (fp16 / bf16 tensor cores) and tiles
better at larger multiples (NVIDIA ModelOpt rounds to 32 by default; the issue-23 measurements
of round_to=32 on an H200 beat round_to=8), onnxruntime's blocked NCHWc CPU kernels use 8
(AVX2), oneDNN's (torch CPU) 8 or 16. See ``../shared/reference/latency.md``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn as nn

from ..hints import did_you_mean
from ..nested import map_tensors

__all__ = ["BACKENDS", "DTYPES", "Backend", "Timer", "as_backend", "batched", "check_backend",
           "check_fields", "check_fits", "default_multiples", "first_tensor", "placed",
           "unavailable"]

BACKENDS = ("torch", "onnxruntime", "cuda")
# dtypes each runtime can run (fp16 convolutions on the CPU are not worth timing: many torch
# CPU kernels lack them; the TorchScript ONNX exporter writes fp32 models)
DTYPES = {"torch": ("fp32", "bf16"), "onnxruntime": ("fp32",), "cuda": ("fp32", "fp16", "bf16")}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# ``timer(model, call) -> milliseconds``: runs (or pretends to run) ``call`` once and returns
# the time it took; ``model`` is the torch module being timed (for a fake clock's cost model)
Timer = Callable[[nn.Module, Callable[[], Any]], float]


@dataclass(frozen=True)
class Backend:
    """Where and how latency is measured.

    Attributes:
        name: ``"torch"`` (eager, CPU), ``"onnxruntime"`` (CPU) or ``"cuda"`` (eager, GPU).
        device: For ``"cuda"``: ``"cuda"`` or ``"cuda:N"`` (default ``"cuda"``, the current
            GPU); the CPU runtimes take None or ``"cpu"``.
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (what the runtime supports: :data:`DTYPES`).
        batch: Batch size of the measured inputs; None keeps the example inputs' batch. Every
            input tensor whose first dimension is the example batch is repeated to this size.
        threads: CPU threads (torch's, restored afterwards, or onnxruntime's intra-op ones);
            None keeps torch's current setting. 1 by default: on a shared machine more threads
            make the numbers swing.
        runs: Timed passes per model; the median is the figure.
        warmup: Untimed passes per model first (allocator, cuDNN autotuning, kernel caches).
        channels_last: Memory format for 4-D inputs and models on ``"cuda"`` (None: True there,
            the format tensor-core convolutions run in; ignored on the CPU runtimes).
        timer: ``timer(model, call) -> ms`` replacing the clock (tests: a fake clock; None:
            ``time.perf_counter`` on the CPU, CUDA events on the GPU). Not part of equality.
    """

    name: str = "torch"
    device: str | None = None
    dtype: str = "fp32"
    batch: int | None = None
    threads: int | None = 1
    runs: int = 10
    warmup: int = 3
    channels_last: bool | None = None
    timer: Timer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        # a torch dtype or another spelling of a name is taken as meant; anything else that
        # is wrong is refused here, when the record is made (whether the runtime is there, a
        # GPU or onnxruntime, is checked where it is used: check_backend)
        if isinstance(self.dtype, torch.dtype):
            names = {v: k for k, v in TORCH_DTYPES.items()}
            if self.dtype not in names:
                raise ValueError(f"latency backend dtype {self.dtype} is not one of "
                                 f"{', '.join(TORCH_DTYPES)}")
            object.__setattr__(self, "dtype", names[self.dtype])
        for name in ("name", "dtype"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() != value:
                object.__setattr__(self, name, value.lower())
        check_fields(self)

    @property
    def is_cuda(self) -> bool:
        """Whether the model runs on a GPU."""
        return self.name == "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` of :attr:`dtype`."""
        return TORCH_DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """Where the model runs (``cpu`` for the CPU runtimes)."""
        return torch.device(self.device or "cuda") if self.is_cuda else torch.device("cpu")

    @property
    def run_device(self) -> torch.device:
        """Where models actually run: :attr:`torch_device`, or the CPU under a stand-in clock
        (:attr:`timer`), so the CUDA backend's logic is testable without a GPU."""
        return torch.device("cpu") if self.timer is not None else self.torch_device

    @property
    def memory_channels_last(self) -> bool:
        """Whether 4-D tensors and models are converted to ``torch.channels_last``."""
        return self.is_cuda and self.channels_last is not False

    def channel_multiple(self) -> int:
        """The channel multiple this runtime's kernels want (default ``round_to`` of a MACs
        target, and the step of latency tables and allocation): 32 on CUDA, 8 on the CPU
        runtimes (see the module docstring)."""
        return 32 if self.is_cuda else 8

    def hardware(self) -> str:
        """The processor that runs the model: the GPU's name, or the CPU's model name."""
        if self.timer is not None:
            return "stand-in clock"
        if self.is_cuda:
            with contextlib.suppress(Exception):
                return torch.cuda.get_device_name(self.torch_device)
            return "CUDA GPU"
        return cpu_name()

    def describe(self) -> str:
        """What a speed figure must name: ``"cuda (NVIDIA H200), bf16, batch 64,
        channels_last, eager"`` or ``"onnxruntime (Intel Xeon ...), fp32, batch 1, 1
        thread"``."""
        batch = "example batch" if self.batch is None else f"batch {self.batch}"
        parts = [f"{self.name} ({self.hardware()})", self.dtype, batch]
        if self.is_cuda:
            parts += ["channels_last" if self.memory_channels_last else "contiguous", "eager"]
        else:
            threads = "torch's threads" if self.threads is None else (
                f"{self.threads} thread{'s' if self.threads != 1 else ''}")
            parts.append(threads)
        return ", ".join(parts)

    def key(self) -> dict[str, Any]:
        """What latency measurements depend on (a latency table's cache key): runtime,
        hardware, dtype, batch, threads, memory format and the library versions."""
        versions = {"torch": torch.__version__}
        if self.name == "onnxruntime":
            with contextlib.suppress(ImportError):
                import onnxruntime

                versions["onnxruntime"] = onnxruntime.__version__
        if self.is_cuda:
            versions["cudnn"] = str(torch.backends.cudnn.version())
        return {"name": self.name, "hardware": self.hardware(), "dtype": self.dtype,
                "batch": self.batch, "threads": None if self.is_cuda else self.threads,
                "channels_last": self.memory_channels_last, **versions}


@functools.lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "CPU"


def as_backend(spec: str | Backend | dict[str, Any] | None, **overrides: Any) -> Backend:
    """A :class:`Backend` from a name (``"cuda"``), a dict of its fields (configs) or a record;
    ``overrides`` that are not None replace fields.

    Raises:
        TypeError: ``spec`` is none of those, or a dict holds a field :class:`Backend` lacks.
    """
    if spec is None:
        backend = Backend()
    elif isinstance(spec, Backend):
        backend = spec
    elif isinstance(spec, str):
        backend = Backend(name=spec)
    elif isinstance(spec, dict):
        fields = set(Backend.__dataclass_fields__)
        unknown = sorted(set(spec) - fields)
        if unknown:
            raise TypeError(f"latency backend: unknown field(s) {', '.join(unknown)}; valid: "
                            f"{', '.join(sorted(fields))}"
                            + did_you_mean(unknown[0], sorted(fields)))
        backend = Backend(**spec)
    else:
        raise TypeError("a latency backend is a name ('torch', 'onnxruntime', 'cuda'), a "
                        f"kcp_plugin.Backend or a dict of its fields, got {type(spec).__name__}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(backend, **changes) if changes else backend


def check_fields(backend: Backend) -> None:
    """The record's own checks (made by :class:`Backend` itself): a known runtime, a dtype it
    runs, counts in range, a device of the runtime's kind.

    Raises:
        ValueError / TypeError: naming the field, what was given and the valid choices.
    """
    b = backend
    if b.name not in BACKENDS:
        raise ValueError(f"unknown latency backend {b.name!r}; valid: {', '.join(BACKENDS)}"
                         + did_you_mean(str(b.name), BACKENDS))
    if b.dtype not in DTYPES[b.name]:
        raise ValueError(f"latency backend {b.name!r} cannot run dtype {b.dtype!r}; valid: "
                         f"{', '.join(DTYPES[b.name])}" + did_you_mean(str(b.dtype),
                                                                       DTYPES[b.name]))
    for name, value, low in (("batch", b.batch, 1), ("threads", b.threads, 1),
                             ("runs", b.runs, 1), ("warmup", b.warmup, 0)):
        if value is None and name in ("batch", "threads"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"latency backend {name} must be an integer >= {low}, got "
                             f"{value!r}")
    if b.channels_last not in (None, True, False):
        raise TypeError(f"latency backend channels_last must be None, True or False, got "
                        f"{b.channels_last!r}")
    if b.timer is not None and not callable(b.timer):
        raise TypeError("latency backend timer must be callable as timer(model, call) -> ms")
    if b.is_cuda:
        device = b.device or "cuda"
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"latency backend 'cuda': bad device {device!r} ({exc}); use "
                             "'cuda' or 'cuda:N'") from exc
        if dev.type != "cuda":
            raise ValueError(f"latency backend 'cuda' runs on a GPU; device {device!r} is not "
                             "one (use 'cuda' or 'cuda:N', or backend 'torch' for the CPU)")
    elif b.device not in (None, "cpu"):
        raise ValueError(f"latency backend {b.name!r} runs on the CPU; device {b.device!r} is "
                         "not valid for it (leave it None, or use backend 'cuda')")


def check_backend(backend: Backend, imports: bool = True) -> None:
    """Validate a backend before anything is measured or pruned.

    Args:
        backend: The record (its fields were checked when it was made: :func:`check_fields`).
        imports: Also check that the runtime is there: onnx / onnxruntime for
            ``"onnxruntime"``, a visible GPU (and that device index) for ``"cuda"``.

    Raises:
        ValueError: an unknown runtime, a dtype it cannot run, a device that is not its own,
            a batch / thread / run count out of range, or ``"cuda"`` without a GPU (each
            message names the valid choices).
        ImportError: ``"onnxruntime"`` without the ``deploy`` extra.
    """
    b = backend
    check_fields(b)
    if b.is_cuda and imports and b.timer is None:
        if not torch.cuda.is_available():
            raise ValueError("latency backend 'cuda' needs an NVIDIA GPU, and torch sees none "
                             "here (torch.cuda.is_available() is False); measure on the "
                             "machine you deploy to, or use backend 'torch' or 'onnxruntime' "
                             "(CPU)")
        count = torch.cuda.device_count()
        index = torch.device(b.device or "cuda").index
        if index is not None and index >= count:
            raise ValueError(f"latency backend 'cuda': device {b.device!r} does not exist; "
                             f"this machine has {count} GPU(s): cuda:0..cuda:{count - 1}")
    if imports and b.name == "onnxruntime":
        from .export import require_deploy

        require_deploy()


def unavailable(backend: Backend) -> str | None:
    """Why the backend cannot measure on this machine (no GPU for ``"cuda"``, no onnxruntime
    for ``"onnxruntime"``), or None if it can. For callers that can do without the
    measurement (a MACs target only takes the backend's channel multiple)."""
    try:
        check_backend(backend, imports=True)
    except (ValueError, ImportError) as exc:
        return str(exc)
    return None


def batched(example_inputs: Any, batch: int | None) -> Any:
    """``example_inputs`` with every tensor whose first dimension is the example batch (that of
    the first tensor found) repeated along it to ``batch`` (None: unchanged). Other values and
    tensors keep their shape; the structure (tensor, tuple, list, dict) is kept."""
    if batch is None:
        return example_inputs
    first = first_tensor(example_inputs)
    if first is None or first.dim() == 0:
        return example_inputs
    b0 = first.shape[0]
    if b0 == batch:
        return example_inputs

    def grow(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != b0:
            return t
        reps = -(-batch // b0)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].contiguous()

    return map_tensors(example_inputs, grow)


def placed(model: nn.Module, example_inputs: Any, backend: Backend) -> tuple[nn.Module, Any]:
    """The model and inputs as the backend runs them: inputs batched to ``backend.batch``;
    for ``"cuda"``, a non-fp32 dtype or a model / inputs not already where the backend runs (a
    GPU model timed on a CPU runtime), a deep copy of the model moved to the device and dtype
    (channels-last where asked) and the inputs cast alike (floating tensors only). The user's
    model itself is never moved or cast."""
    inputs = batched(example_inputs, backend.batch)
    if not backend.is_cuda and backend.dtype == "fp32" and _all_on_cpu(model, inputs):
        return model, inputs
    device, dtype = backend.run_device, backend.torch_dtype
    moved = copy.deepcopy(model).to(device=device, dtype=dtype)
    if backend.memory_channels_last:
        channels_last(moved)

    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if backend.memory_channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    return moved, map_tensors(inputs, place)


def place_module(module: nn.Module, backend: Backend) -> nn.Module:
    """A (new, standalone) module moved to the backend's device and dtype, in place."""
    module = module.to(device=backend.run_device, dtype=backend.torch_dtype)
    if backend.memory_channels_last:
        channels_last(module)
    return module


def channels_last(module: nn.Module) -> nn.Module:
    """Put the 4-D parameters and buffers of ``module`` in ``torch.channels_last``, in place.
    ``module.to(memory_format=...)`` refuses a model with any weight of another rank (3-D
    convs of a stereo cost volume); their tensors stay as they are."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    return module


def place_tensor(t: torch.Tensor, backend: Backend) -> torch.Tensor:
    """A (floating) tensor on the backend's device and dtype, channels-last where asked."""
    t = t.to(device=backend.run_device, dtype=backend.torch_dtype)
    if backend.memory_channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


@contextlib.contextmanager
def backend_settings(backend: Backend) -> Iterator[int | None]:
    """Torch's settings for a measurement, restored afterwards: the CPU thread count, and on
    CUDA ``cudnn.benchmark=True`` (each shape's fastest algorithm, as a deployment tunes).
    Yields the thread count in effect (None on CUDA)."""
    previous = torch.get_num_threads()
    bench = torch.backends.cudnn.benchmark
    if backend.threads and not backend.is_cuda:
        torch.set_num_threads(backend.threads)
    if backend.is_cuda:
        torch.backends.cudnn.benchmark = True
    try:
        yield None if backend.is_cuda else torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
        torch.backends.cudnn.benchmark = bench


def default_timer(backend: Backend) -> Timer:
    """The clock of a backend: its :attr:`Backend.timer`, CUDA events on ``"cuda"``
    (recorded around the pass, then synchronized: GPU time including launch gaps), else
    ``time.perf_counter``."""
    if backend.timer is not None:
        return backend.timer
    if backend.is_cuda:
        device = backend.torch_device

        def cuda_timer(model: nn.Module, call: Callable[[], Any]) -> float:
            with torch.cuda.device(device):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                start.record()
                call()
                end.record()
                end.synchronize()
                return float(start.elapsed_time(end))

        return cuda_timer

    def wall_timer(model: nn.Module, call: Callable[[], Any]) -> float:
        begin = time.perf_counter()
        call()
        return (time.perf_counter() - begin) * 1e3

    return wall_timer


def check_fits(model: nn.Module, example_inputs: Any, backend: Backend,
               forward_fn: Callable[[nn.Module, Any], Any]) -> None:
    """Run ``model`` once as the backend will (device, dtype, batch), so a batch that does not
    fit in memory, or a model that cannot run in the dtype, is reported before anything is
    measured or pruned.

    Raises:
        ValueError: out of memory at ``backend.batch``, or the model fails in the dtype (the
            message names the batch / dtype and what to change).
    """
    if backend.timer is not None or (backend.batch is None and backend.dtype == "fp32"
                                     and not backend.is_cuda):
        return  # a fake clock runs nothing; fp32 at the example batch already ran in check_runs
    from ..graph import preserved_modes

    try:
        moved, inputs = placed(model, example_inputs, backend)
        with preserved_modes(moved), torch.inference_mode(), backend_settings(backend):
            moved.eval()
            forward_fn(moved, inputs)
    except torch.cuda.OutOfMemoryError as exc:
        raise ValueError(
            f"latency backend: batch {backend.batch} does not fit in {backend.torch_device}'s "
            f"memory with this model ({str(exc).splitlines()[0]}); use a smaller batch") from exc
    except RuntimeError as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "memory" in text.lower():
            raise ValueError(f"latency backend: batch {backend.batch} does not fit in memory "
                             f"({text}); use a smaller batch") from exc
        raise ValueError(f"the model does not run on latency backend {backend.describe()} "
                         f"({text}); choose another dtype or backend") from exc
    finally:
        if backend.is_cuda:
            with contextlib.suppress(Exception):
                del moved
            torch.cuda.empty_cache()


def default_multiples(model: nn.Module, fixed: list[nn.Module], multiple: int) -> list[int]:
    """The channel multiples a MACs target tries by default: the backend's ``multiple``,
    halved while the median width of the prunable conv / linear layers is under 8 multiples
    (a 16-channel net rounded to 8 could only halve its layers); where the target is out of
    reach with it, half of it, then 1 (plain widths)."""
    skip = {id(m) for f in fixed for m in f.modules()}
    widths = sorted(
        (m.out_features if isinstance(m, nn.Linear) else m.out_channels)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and id(m) not in skip)
    median = widths[len(widths) // 2] if widths else 0
    m = max(1, multiple)
    while m > 1 and median < 8 * m:
        m //= 2
    out = [m]
    while out[-1] > 1 and len(out) < 3:  # the multiple, half of it, then plain widths
        out.append(out[-1] // 2 if len(out) < 2 else 1)
    return out


def _all_on_cpu(model: nn.Module, inputs: Any) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    found: list[torch.Tensor] = []
    map_tensors(inputs, lambda t: found.append(t) or t)
    return all(t.device.type == "cpu" for t in tensors + found)


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The first tensor in ``obj`` (a tensor, or nested tuples / lists / dicts), or None."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None
