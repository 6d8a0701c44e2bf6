"""coe: a Composition of Experts serving system."""

from coe.config import CoEConfig, ExpertConfig, default_config, from_yaml
from coe.errors import CoEError
from coe.types import ChatMessage, Completion, Request, RouteDecision, SamplingParams, StreamEvent

__version__ = "0.1.0"
__all__ = [
    "CoEConfig",
    "ExpertConfig",
    "default_config",
    "from_yaml",
    "CoEError",
    "ChatMessage",
    "Completion",
    "Request",
    "RouteDecision",
    "SamplingParams",
    "StreamEvent",
    "__version__",
]
