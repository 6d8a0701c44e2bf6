"""The llama.cpp library (llama-cpp-python): imported once, with its CPU backend registered.

coe's wheel (scripts/llama_wheel.sh) is portable: one CPU backend per x86-64 level
(``libggml-cpu-<variant>.so`` beside libllama: sse42, haswell (AVX2), skylakex (AVX-512),
sapphirerapids (AMX), zen4, ...). ggml would look for them beside the Python executable and in
the working directory, not beside the library, so coe registers one itself before any model is
loaded: the variant named by ``COE_LLAMA_CPU_VARIANT`` (to compare variants, or to step around a
faulty one), else the one that scores best on this CPU (each variant's own ``ggml_backend_score``
is 0 where the CPU lacks an instruction it was built for). A build with the CPU backend linked in
(no variant files) needs nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from coe.errors import LoadError, MissingExtra

VARIANT_ENV = "COE_LLAMA_CPU_VARIANT"
_PREFIX, _SUFFIX = "libggml-cpu-", ".so"


@dataclass(frozen=True)
class CpuBackend:
    """Which CPU backend llama.cpp runs on: ``variant`` is None for a build with one linked in."""

    variant: str | None
    path: Path | None
    available: tuple[str, ...] = ()  # every variant the build ships


_lock = threading.Lock()
_backend: CpuBackend | None = None


def load_llama_cpp() -> ModuleType:
    """``llama_cpp``, with a CPU backend registered (once per process)."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingExtra("llama_cpp", "llama") from None
    quiet = logging.getLogger("llama-cpp-python")
    if quiet.level == logging.NOTSET:  # llama.cpp logs every context creation to stderr otherwise
        quiet.setLevel(logging.ERROR)
    cpu_backend()
    return llama_cpp


def cpu_backend() -> CpuBackend:
    """Register the CPU backend variant for this machine (first call) and say which it is."""
    global _backend
    with _lock:
        if _backend is None:
            _backend = _register()
        return _backend


def _register() -> CpuBackend:
    import llama_cpp
    import llama_cpp.llama_cpp as bindings

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    variants = {
        p.name[len(_PREFIX) : -len(_SUFFIX)]: p
        for p in sorted(lib_dir.glob(f"{_PREFIX}*{_SUFFIX}"))
    }
    if not variants:
        return CpuBackend(None, None)
    lib = bindings._lib  # dlsym through libllama finds the ggml it is linked against
    lib.ggml_backend_reg_count.restype = ctypes.c_size_t
    lib.ggml_backend_load.argtypes, lib.ggml_backend_load.restype = (
        [ctypes.c_char_p],
        ctypes.c_void_p,
    )
    chosen = os.environ.get(VARIANT_ENV) or _best(variants)
    if chosen not in variants:
        raise LoadError(
            f"{VARIANT_ENV}={chosen!r}: this llama.cpp build has the CPU variants "
            f"{', '.join(variants)}"
        )
    if lib.ggml_backend_reg_count() == 0 and not lib.ggml_backend_load(
        str(variants[chosen]).encode()
    ):
        raise LoadError(f"llama.cpp could not load its CPU backend {variants[chosen]}")
    return CpuBackend(chosen, variants[chosen], tuple(variants))


def _best(variants: dict[str, Path]) -> str:
    """The variant with the highest ``ggml_backend_score`` on this CPU (what ggml itself picks)."""
    scores = {}
    for name, path in variants.items():
        score = ctypes.CDLL(str(path)).ggml_backend_score
        score.restype = ctypes.c_int
        scores[name] = score()
    best = max(scores, key=lambda name: scores[name])
    if scores[best] <= 0:
        raise LoadError(
            f"no llama.cpp CPU backend in {next(iter(variants.values())).parent} runs on this CPU"
        )
    return best


PROBE_TIMEOUT_S = 300.0


def probe_default_load(
    path: Path, repack: bool = True, timeout_s: float = PROBE_TIMEOUT_S
) -> str | None:
    """Load ``path`` and decode one token in a child process, with llama.cpp's default model
    settings (``repack``: its extra buffer types, i.e. repacked weights and, on AMX CPUs, the AMX
    kernels). None if that worked; else what went wrong. A native crash ends only the child."""
    import signal
    import subprocess
    import sys

    code = "import sys; from coe.backends.llama_lib import _probe; _probe(sys.argv[1], sys.argv[2] == '1')"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(path), "1" if repack else "0"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return f"loading {path.name} and decoding one token took longer than {timeout_s:.0f} s"
    if done.returncode < 0:
        return f"llama.cpp crashed with {signal.Signals(-done.returncode).name} on its first decode of {path.name}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return lines[-1] if lines else f"the probe exited with {done.returncode}"
    return None


def _probe(path: str, repack: bool) -> None:
    """The child of ``probe_default_load``: the three lines a llama-cpp-python user writes."""
    llama_cpp = load_llama_cpp()
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = repack
    from llama_cpp import _internals

    model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
    context = llama_cpp.llama_context_default_params()
    context.n_ctx, context.n_threads, context.n_threads_batch = 512, 2, 2
    ctx = _internals.LlamaContext(model=model, params=context, verbose=False)
    batch = _internals.LlamaBatch(n_tokens=8, embd=0, n_seq_max=1, verbose=False)
    ids = model.tokenize(b"Hello", add_bos=True, special=False)
    batch.set_batch(ids, n_past=0, logits_all=False)
    if llama_cpp.llama_decode(ctx.ctx, batch.batch) != 0:
        raise SystemExit("llama_decode failed")
