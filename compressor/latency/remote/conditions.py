"""Drift of a device's figures, caught by a re-timed reference (each measurement's record, with its throttling,
changing temperature and parallel probe, is records.py's).

A device that heats up or is throttled gives slower figures later in a run than
earlier (TVM #11465: 0.083 -> 0.148 s per iteration at 90 C). Every figure a
comparison uses comes from one interleaved measurement, so drift hits all its
models alike; across measurements it does not. So the first artifact a device
ever measures (the unpruned baseline, in a prune) is the reference: each later
measurement that includes it, or that it is added to (at least every
`retime_every` measurements), compares its median with the median of its
earlier figures (robust to one odd figure, and a slow drift still shows), and
a move beyond the tolerance flags the figures as drifted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from compressor.latency.timing import LatencyStats


def version_matches(found: str, named: str) -> bool:
    """`named` "1.20" matches 1.20, 1.20.1 and 1.20.1-dev; not 1.2 or 1.21."""
    found, named = str(found).strip(), str(named).strip()
    return found == named or found.startswith((named + ".", named + "-", named + "+"))


class DriftWatch:
    """The reference artifact's first median (ms), and how many measurements since it was last timed."""

    def __init__(self, every: int, tolerance: float) -> None:
        self.every, self.tolerance = every, tolerance
        self.reference: dict | None = None  # key, name, path, first_ms
        self.seen_ms: list[float] = []  # the reference's medians so far
        self.since = 0

    def due(self, keys: Sequence[str]) -> dict | None:
        """The reference, when it must be added to a measurement of `keys` (it is not among them and
        `every` measurements have passed without it); else None."""
        if self.reference is None or self.reference["key"] in keys or self.since + 1 < self.every:
            return None
        return self.reference

    def observe(self, measured: dict, stats: list[LatencyStats], added: dict | None) -> dict | None:
        """Record one measurement (`stats` of [reference if `added`] + measured artifacts); the reference's
        drift if it was timed, else None. `measured` holds the artifacts' keys, names and remote paths."""
        keys = measured["keys"]
        if self.reference is None:
            self.reference = {"key": keys[0], "name": measured["names"][0], "path": measured["paths"][0],
                              "first_ms": stats[0].median}
        ref = self.reference
        if added is not None:
            median = stats[0].median
        elif ref["key"] in keys:
            median = stats[keys.index(ref["key"])].median
        else:
            self.since += 1
            return None
        self.since = 0
        earlier = float(np.median(self.seen_ms)) if self.seen_ms else median
        self.seen_ms.append(median)
        drift = median / earlier - 1
        return {"artifact": ref["name"], "median_ms": median, "earlier_ms": earlier, "first_ms": ref["first_ms"],
                "drift": drift, "drifted": abs(drift) > self.tolerance, "retimed": added is not None}
