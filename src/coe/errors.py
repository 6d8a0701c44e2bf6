"""One error tree for the whole system.

Every error carries the HTTP status and OpenAI error ``type``/``code`` it maps to, so the
server translates it in exactly one handler and the CLI prints its message without a trace.
"""

from __future__ import annotations


class CoEError(Exception):
    """Base of every error coe raises on purpose."""

    http_status: int = 500
    error_type: str = "internal_error"
    code: str | None = None
    retry_after_s: float | None = None  # set: the HTTP answer carries Retry-After

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def to_openai(self) -> dict:
        """The OpenAI wire format: {"error": {"message", "type", "param", "code"}}."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class ConfigError(CoEError):
    """A config file or value is wrong; the message names the file and the field."""

    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_config"

    def within(self, where: str) -> ConfigError:
        """The same error inside ``where`` (a section or a list item): ``experts[1].`` goes before
        its message and its field."""
        return ConfigError(f"{where}.{self.message}", param=f"{where}.{self.param or ''}")


class InvalidRequest(CoEError):
    http_status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    """The request body is larger than ``server.max_body_bytes``."""

    http_status = 413
    code = "request_too_large"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class UnknownExpert(CoEError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class RoutingError(CoEError):
    http_status = 500
    error_type = "routing_error"


class RouterUnavailable(CoEError):
    """The router's trained artifact is missing or corrupt; the message says how to fix it."""

    http_status = 503
    error_type = "router_unavailable"
    code = "router_unavailable"


class ModelNotAvailable(CoEError):
    """The weights of a packaged model are not installed or fail their checksum."""

    http_status = 503
    error_type = "model_unavailable"
    code = "model_unavailable"


class LoadError(CoEError):
    http_status = 503
    error_type = "load_error"
    code = "load_failed"


class ExpertUnavailable(LoadError):
    """The expert could not be made ready (load error, out of memory, corrupt weights) and backs
    off; ``retry_after_s`` says when it will be tried again."""

    code = "expert_unavailable"
    retry_after_s = 1.0


class CacheFull(CoEError):
    http_status = 503
    error_type = "cache_full"
    code = "cache_full"


class Overloaded(CoEError):
    """Too many requests are waiting; ``retry_after_s`` estimates when a slot frees (Retry-After)."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "overloaded"
    retry_after_s = 1.0


class RateLimited(Overloaded):
    """One API key sent more than ``server.rate_limit_per_minute`` requests in a minute."""

    code = "rate_limit_exceeded"


class AuthenticationError(CoEError):
    """A protected route was called without a valid API key."""

    http_status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class RequestTimeout(CoEError):
    """A request ran past ``server.request_timeout_s`` (queued or generating)."""

    http_status = 408
    error_type = "timeout_error"
    code = "request_timeout"


class MissingExtra(CoEError):
    """An optional dependency is missing; the message names the extra to install."""

    http_status = 500
    error_type = "missing_dependency"

    def __init__(self, module: str, extra: str):
        super().__init__(f"{module!r} is not installed: pip install 'coe[{extra}]'")


class GenerationError(CoEError):
    http_status = 500
    error_type = "generation_error"


class ExpertCrashed(GenerationError):
    """An expert's worker process died (a native crash, a kill) or was stopped for outgrowing
    its memory: its requests end, it backs off, the server goes on."""

    http_status = 503
    code = "expert_crashed"
