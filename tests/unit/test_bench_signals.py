"""`coe bench ...` unwinds on SIGTERM, so a `timeout` runs the benches' cleanup (temp folders of
expert copies, child servers). The real counterpart: test_serving_real's bench serve run checks
that the copies are gone after a normal end."""
import os
import signal

import pytest

from coe.bench import exit_on_sigterm


def test_sigterm_raises_system_exit_so_finally_blocks_run():
    previous = signal.getsignal(signal.SIGTERM)
    cleaned = []
    try:
        exit_on_sigterm()
        with pytest.raises(SystemExit) as exc:
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
                cleaned.append(False)
            finally:
                cleaned.append(True)
        assert exc.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert cleaned == [True]  # the finally ran, the line after the kill did not
