import pytest

from coe import errors


@pytest.mark.parametrize("cls, status, code", [
    (errors.ConfigError, 400, "invalid_config"), (errors.InvalidRequest, 400, "invalid_request"),
    (errors.ContextLengthExceeded, 400, "context_length_exceeded"), (errors.UnknownExpert, 404, "model_not_found"),
    (errors.ModelNotAvailable, 503, "model_unavailable"), (errors.LoadError, 503, "load_failed"),
    (errors.CacheFull, 503, "cache_full"), (errors.Overloaded, 429, "overloaded"),
    (errors.GenerationError, 500, None), (errors.RoutingError, 500, None),
])
def test_every_error_maps_to_http_and_openai(cls, status, code):
    error = cls("went wrong", param="field")
    assert isinstance(error, errors.CoEError)
    assert error.http_status == status
    assert error.to_openai() == {"error": {"message": "went wrong", "type": cls.error_type, "param": "field",
                                           "code": code}}


def test_code_can_be_overridden_per_instance():
    assert errors.InvalidRequest("x", code="special").code == "special"
    assert errors.InvalidRequest("x").code == "invalid_request"


def test_missing_extra_names_the_extra():
    assert errors.MissingExtra("llama_cpp", "llama").message == "'llama_cpp' is not installed: pip install 'coe[llama]'"


def test_context_length_is_an_invalid_request():
    assert issubclass(errors.ContextLengthExceeded, errors.InvalidRequest)
