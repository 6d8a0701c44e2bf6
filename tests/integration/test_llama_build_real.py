"""The llama.cpp build on the machine the tests run on: its default load path (weights repacked,
AMX kernels on CPUs that have them) decodes without crashing, in a child process so that a native
crash fails a test instead of killing the test runner; coe registers a CPU backend that runs here."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from coe.config import default_config
from coe.models import ModelStore

pytestmark = pytest.mark.integration


def packaged_paths(coe_home):
    pytest.importorskip("llama_cpp")
    store = ModelStore(coe_home)
    paths = {}
    for expert in default_config().experts:
        if store.status(expert.source) == "not installed":
            pytest.skip(f"packaged model {expert.source} is not installed (make setup)")
        paths[expert.name] = store.ensure(expert.source)
    return paths


@pytest.mark.parametrize("repack", [True, False])
def test_every_default_expert_loads_and_decodes_with_llama_cpp_defaults(coe_home, repack):
    from coe.backends.llama_lib import probe_default_load

    problems = {name: probe_default_load(path, repack=repack) for name, path in packaged_paths(coe_home).items()}
    assert problems == {name: None for name in problems}


def test_the_registered_cpu_backend_is_one_this_cpu_runs(coe_home):
    from coe.backends.llama_lib import cpu_backend, load_llama_cpp

    load_llama_cpp()
    backend = cpu_backend()
    if backend.variant is not None:  # the portable build: one of its variants, the best scoring
        assert backend.variant in backend.available and backend.path.is_file()


def test_an_unknown_cpu_variant_is_refused_naming_the_ones_there(coe_home):
    from coe.backends.llama_lib import cpu_backend, load_llama_cpp

    load_llama_cpp()
    if cpu_backend().variant is None:
        pytest.skip("this llama.cpp build has its CPU backend linked in (no variants)")
    code = "from coe.backends.llama_lib import load_llama_cpp; load_llama_cpp()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COE_LLAMA_CPU_VARIANT": "pentium"})
    assert done.returncode != 0
    assert "COE_LLAMA_CPU_VARIANT='pentium'" in done.stderr and cpu_backend().variant in done.stderr


def test_an_expert_with_repack_on_serves(coe_home):
    from coe.backends.llama_cpp import LlamaCppBackend
    from coe.backends.memory import HostBufferPool
    from coe.config import ExpertConfig
    from coe.engine.batch import generate
    from coe.types import Request, SamplingParams

    path = packaged_paths(coe_home)["smollm2-135m"]
    backend = LlamaCppBackend()
    host = backend.read(ExpertConfig("repacked", str(path), params={"repack": True, "n_ctx": 512}), path,
                        HostBufferPool())
    runner = backend.materialize(host)
    try:
        request = Request("repacked", SamplingParams(max_tokens=8, temperature=0.0), prompt="The capital of France is")
        final = [e for e in generate(runner, [request]) if e.is_final][-1]
        assert final.error is None and final.completion.completion_tokens >= 1
    finally:
        runner.close()
        host.release()


def test_llama_cpp_runs_its_own_threads_not_openmp(coe_home):
    """ggml built with OpenMP shares torch's libgomp, and a router's torch op on another thread then
    slows every decode 3x (scripts/llama_wheel.sh); the wheel coe builds has no OpenMP."""
    from coe.backends.llama_lib import cpu_backend, load_llama_cpp

    load_llama_cpp()
    if cpu_backend().variant is None:
        pytest.skip("not coe's portable build (llama.cpp from elsewhere)")
    code = ("from coe.backends.llama_lib import load_llama_cpp, cpu_backend; load_llama_cpp(); cpu_backend()\n"
            "import sys; sys.stdout.write(''.join(l for l in open('/proc/self/maps') if 'gomp' in l or 'ggml' in l))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ggml-cpu" in done.stdout  # the CPU backend is loaded
    assert "gomp" not in done.stdout
