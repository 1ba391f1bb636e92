"""Unit-importance criteria behind one registry and one signature (registry.py).

A criterion maps a ScoringContext to {unit name: importance}; higher = keep.
Importing this package registers every built-in criterion.
"""

from compressor.criteria import cka, entropy, magnitude, random, sr_init, taylor  # noqa: F401  (registration)
from compressor.criteria.registry import (
    COSTS,
    CRITERIA,
    Criterion,
    ScoringContext,
    get_criterion,
    register,
    score_units,
)

__all__ = ["COSTS", "CRITERIA", "Criterion", "ScoringContext", "get_criterion", "register", "score_units"]
