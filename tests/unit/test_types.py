import threading

import pytest

from coe.errors import InvalidRequest
from coe.types import ChatMessage, Completion, Request, SamplingParams, StreamEvent


def test_sampling_defaults():
    sampling = SamplingParams()
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.stop, sampling.seed) == \
        (256, 1.0, 1.0, (), None)


@pytest.mark.parametrize("kwargs, param", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"), ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": float("nan")}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"stop": ("a", "b", "c", "d", "e")}, "stop"), ({"stop": ("",)}, "stop"),
])
def test_sampling_validation_names_the_param(kwargs, param):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param
    assert info.value.http_status == 400


def test_request_takes_messages_or_prompt_not_both():
    with pytest.raises(InvalidRequest):
        Request("a")
    with pytest.raises(InvalidRequest):
        Request("a", prompt="x", messages=(ChatMessage("user", "x"),))
    assert Request("a", prompt="x").prompt == "x"


def test_request_ids_are_unique():
    assert Request("a", prompt="x").id != Request("a", prompt="x").id


def test_cancel_from_another_thread():
    request = Request("a", prompt="x")
    assert not request.cancelled
    thread = threading.Thread(target=request.cancel)
    thread.start()
    thread.join()
    assert request.cancelled


def test_stream_event_finality():
    assert not StreamEvent("r", delta="x").is_final
    assert StreamEvent("r", completion=Completion("", "stop", 1, 0)).is_final
    assert StreamEvent("r", error=RuntimeError()).is_final
