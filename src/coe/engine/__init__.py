"""The request loop."""
from coe.engine.engine import Engine
from coe.engine.scheduler import Batch, Scheduler

__all__ = ["Engine", "Batch", "Scheduler"]
