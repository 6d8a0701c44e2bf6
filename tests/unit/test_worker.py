"""The worker protocol's pure parts: errors rebuilt across the pipe, how a worker ended, and the
config switch. The worker processes themselves run in tests/integration/test_isolation_real.py
(real packaged experts, killed mid-stream); llama.cpp keys, isolate included, in test_config.py."""
from __future__ import annotations

import os
import signal

import pytest

from coe.backends.worker import Failed, WorkerProcess, _how_it_ended
from coe.errors import ExpertCrashed, GenerationError, InvalidRequest


def test_an_error_in_the_worker_is_rebuilt_as_its_own_class():
    error = Failed("InvalidRequest", "grammar: bad", "response_format").error()
    assert isinstance(error, InvalidRequest) and error.message == "grammar: bad"
    assert error.param == "response_format" and error.http_status == 400
    unknown = Failed("NoSuchError", "boom").error()
    assert type(unknown) is GenerationError and unknown.message == "boom"


def test_how_a_worker_ended_is_said_in_words():
    assert _how_it_ended(-signal.SIGSEGV) == "was killed by SIGSEGV"
    assert _how_it_ended(-signal.SIGKILL) == "was killed by SIGKILL"
    assert _how_it_ended(134) == "exited with status 134"
    assert ExpertCrashed("x").http_status == 503 and ExpertCrashed("x").code == "expert_crashed"


def test_a_dead_worker_raises_expert_crashed_naming_the_signal():
    worker = WorkerProcess("tiny")
    try:
        assert worker.alive
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(ExpertCrashed, match="tiny: its worker process .* was killed by SIGKILL"):
            worker.call(("anything",))
        assert not worker.alive
    finally:
        worker.stop()


def test_a_worker_exits_when_its_pipe_closes():
    worker = WorkerProcess()
    worker.stop()
    assert worker.process.returncode == 0
