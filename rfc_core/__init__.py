"""Relational Feature Caching in plain torch: nothing here imports ComfyUI."""

from .config import CACHE_DEVICES, CACHE_DTYPES, RANGES, SCHEDULERS, CacheConfig, check_range
from .estimators import ESTIMATORS, RelationalEstimator, ReuseEstimator, TaylorEstimator, make_estimator
from .history import FeatureHistory, lagrange_weights
from .run import RFCRun
from .schedulers import FixedIntervalScheduler, RelationalScheduler

__all__ = [
    "CacheConfig", "CACHE_DEVICES", "CACHE_DTYPES", "RANGES", "SCHEDULERS", "check_range",
    "ESTIMATORS", "RelationalEstimator", "ReuseEstimator", "TaylorEstimator", "make_estimator",
    "FeatureHistory", "lagrange_weights", "RFCRun", "FixedIntervalScheduler", "RelationalScheduler",
]
