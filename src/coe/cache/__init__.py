"""Expert weights across tiers; ModelCache is the only mover."""

from coe.cache.manager import CacheSnapshot, CacheStats, ExpertState, ModelCache, TierUsage

__all__ = ["CacheSnapshot", "CacheStats", "ExpertState", "ModelCache", "TierUsage"]
