"""Expert weights across tiers; ModelCache is the only mover."""
from coe.cache.manager import ExpertState, ModelCache

__all__ = ["ExpertState", "ModelCache"]
