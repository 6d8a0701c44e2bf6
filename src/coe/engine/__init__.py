"""The request loop."""
from coe.engine.engine import Engine
from coe.engine.scheduler import Batch, FifoScheduler

__all__ = ["Engine", "Batch", "FifoScheduler"]
