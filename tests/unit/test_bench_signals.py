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


def test_alternating_ratio_cancels_the_penalty_of_running_second():
    from coe.bench import alternating_ratio

    # B is 1.10x A; whichever runs second in a pair pays 1.5x (pairs alternate: A first, B first)
    a_s, b_s = [], []
    for i in range(8):
        a_second, b_second = i % 2 == 1, i % 2 == 0
        a_s.append(1.0 * (1.5 if a_second else 1.0))
        b_s.append(1.1 * (1.5 if b_second else 1.0))
    assert alternating_ratio(a_s, b_s) == pytest.approx(1.1)
    naive = sorted(b / a for a, b in zip(a_s, b_s))
    assert naive[len(naive) // 2] != pytest.approx(1.1)  # a median of the raw pair ratios is not


def test_alternating_ratio_ignores_one_disturbed_block():
    from coe.bench import alternating_ratio

    a_s, b_s = [1.0] * 8, [1.0] * 8
    b_s[3] = 4.0  # one run 4x slow (this VM's slow spells)
    assert alternating_ratio(a_s, b_s) == pytest.approx(1.0)


def test_in_turn_rotates_which_side_leads():
    from coe.bench import in_turn

    order: list[tuple[int, int]] = []
    runs = in_turn(lambda side, i: order.append((side, i)) or f"{side}:{i}", 2, 4)
    assert runs == [["0:0", "0:1", "0:2", "0:3"], ["1:0", "1:1", "1:2", "1:3"]]
    assert [side for side, _ in order] == [0, 1, 1, 0, 0, 1, 1, 0]  # each side leads every other round
