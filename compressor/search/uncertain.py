"""Aiming past the latency model's uncertainty: ask for the required saving plus z standard errors.

The knapsack and greedy selection add up per-unit savings; the latency model also knows how
uncertain its prediction of a whole set is (compressor/latency/model.py), which differs from set to
set (sets of many units from a precisely fitted group are known better than sets of rare units). A
proposal is taken only when its predicted saving, less `z` standard errors, still reaches the
required saving; otherwise the proposer is asked again for the shortfall more. So the margin the
search keeps against the model comes from the model's own uncertainty, set by set, not from a fixed
share of the latency.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from compressor.search.knapsack import Choice, Proposer

Z = 1.0  # standard errors of the predicted saving to aim past (about 5 in 6 sets then save enough)
TRIES = 4  # re-asks for the shortfall, at most


def aiming_past_uncertainty(choose: Proposer, saving_ms: Callable[[tuple[str, ...]], float],
                            sd_ms: Callable[[tuple[str, ...]], float], z: float = Z) -> Proposer:
    """A proposer over `choose` whose sets are predicted to save `required_ms` with `z` standard errors
    to spare (`saving_ms` and `sd_ms` of a set by the model); where no set does, the last one `choose`
    reached. The search's bounds (`below`: save less than an overshooting set; `exclude`: sets measured
    already) are passed on to `choose` with every ask."""
    def propose(required_ms: float, below: Collection[str] | None = None,
                exclude: Collection[Collection[str]] = ()) -> Choice | None:
        ask, choice = required_ms, None
        for _ in range(TRIES):
            found = choose(ask, below=below, exclude=exclude)
            if found is None:
                return choice
            choice = found
            if not choice.removed:
                return choice
            short = required_ms + z * sd_ms(choice.removed) - saving_ms(choice.removed)
            if short <= 1e-9 * max(1.0, abs(required_ms)):
                return choice
            ask += short
        return choice

    return propose
