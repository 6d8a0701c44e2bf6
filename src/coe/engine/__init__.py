"""The request loop."""

from coe.engine.batch import RunningBatch, generate, next_token_logprobs
from coe.engine.engine import Engine
from coe.engine.scheduler import Batch, Scheduler

__all__ = ["Engine", "Batch", "Scheduler", "RunningBatch", "generate", "next_token_logprobs"]
