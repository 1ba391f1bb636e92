"""Set selection by measured KL: proposals for the search judged by what the whole set does.

The knapsack (search.py) adds up single-unit scores, so it cannot see that two removals
together cost more (or less) than apart; at 1.3x on efficientnet_lite0 no criterion's
knapsack set beat random sets (benchmarks/results/criteria_at_speedup.md). Here a set is
judged by running the model with the set removed on calibration images and taking the KL
divergence of its logits from the unpruned model's.

GreedyOrder removes units one at a time, each time the one that loses least KL per ms
saved *given the units already removed*. A step may also deepen a block it already took:
slim it further or take it out (PEEL's reallocation, one channel level at a time), so a block
slimmed early is not stranded at that width. least_kl keeps, of its proposal and other
proposers' (knapsacks), the set with the least measured KL; greedy_proposer is what
`prune --selection greedy` uses.

Cost: U forward passes over the calibration images for the first step (each unit alone, which
the report shows), then lazy evaluation (Minoux's accelerated greedy): the units are tried in
the order of the KL per ms they cost when last evaluated, and a step stops where the next one's
last figure is above the best one tried. That is exact where a removal costs at least as much
after others as before, which does not always hold. On EfficientNet-Lite0 with 36 depth and width
units, 8 lazy steps took 54 passes instead of 176 (220 s against 681 s on 2 CPU cores) and reached
the same 8-block set; in between they took blocks 4, 6 and 7 in another order, at KLs 4-16%
higher after two steps and 9-16% lower after three (docs/results.md). `lazy=False` evaluates
every allowed unit at every step. A search asking for a saving also evaluates every unit that
reaches it after a prefix, so the prefix's completion is the least-KL one either way. The models
run where the images are (the training device): each set's model is built on the CPU and copied
there.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compressor.errors import InputError
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit
from compressor.metrics.outputs import divergence, named_outputs, output_spec
from compressor.search.knapsack import Choice, Proposer, choose_units, removable_limits

BATCH = 64  # images per forward pass


@dataclass(frozen=True)
class Step:
    """One greedy removal: the unit, the table's cumulative saving (ms) and the set's KL (nats)."""

    unit: str
    saving_ms: float
    kl: float


def logits_of(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """`model`'s named outputs (metrics/outputs.py) on `x` in eval mode, BATCH images at a time (its mode
    restored)."""
    mode = model.training
    model.eval()
    with torch.no_grad():
        parts = [named_outputs(model(x[i:i + BATCH])) for i in range(0, len(x), BATCH)]
    model.train(mode)
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` itself where it is on `device` already, else a copy there."""
    if next(model.parameters(), torch.empty(0)).device == device:
        return model
    return copy.deepcopy(model).to(device)


def class_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model`'s class logits on `x` (its first class-logits output, metrics/outputs.py): what INT8 fidelity
    compares. InputError for a model without one."""
    named = logits_of(model, x)
    first = output_spec(named).first_logits
    if first is None:
        msg = f"the model has no class-logits output (its outputs: {', '.join(named)}); INT8 is judged on class logits"
        raise InputError(msg)
    return named[first]


def kl_from(reference: dict[str, torch.Tensor] | torch.Tensor, logits: dict[str, torch.Tensor] | torch.Tensor
            ) -> float:
    """Mean KL(reference || logits) over the images (nats): of the class logits, and for a model with other
    outputs the mean with their normalised squared errors (metrics/outputs.divergence)."""
    reference, logits = named_outputs(reference), named_outputs(logits)
    return float(divergence(output_spec(reference), reference, logits).mean())


def deepens(unit: Unit, held: Unit, savings_ms: dict[str, float]) -> bool:
    """Whether `unit` may replace `held`, an option of the same block already taken, as a step further: it
    saves more by the table and does what `held` does and more (it takes the whole block out, or slims or
    removes the same block or branch that `held` slims). A merge or a branch removal is not deepened into a
    sibling branch: that would put back what `held` took."""
    if unit.path != held.path or savings_ms[unit.name] <= savings_ms[held.name]:
        return False
    return unit.removes_block or unit.acts_on == held.acts_on


class GreedyOrder:
    """The greedy removal order of `units`, extended one step at a time as savings are asked for.

    A step takes, among the units still allowed (a stage keeps `min_per_stage` blocks; a block takes
    one option at a time; units saving nothing by the table are skipped), the one with the least rise
    in KL per ms of table saving. An option of a block already taken is allowed where it `deepens`
    the one held, and replaces it (75% -> 50% -> removed); its saving is what it adds.
    `choose(required_ms)` takes the shortest prefix of the order that one more allowed unit brings to
    `required_ms`, and of those units (each evaluated after that prefix) the one with the least KL; so
    the proposals are not only prefixes, and a search
    stepping up its requirement finds sets between two prefixes. The result is a search.Choice
    whose importance_lost is that set's KL. Like the knapsack, it proposes no set the search already
    measured (`exclude`) and, after a pass that removed more than the target needs, only sets saving
    less than it (`below`).
    """

    def __init__(self, model: nn.Module, units: Sequence[Unit], savings_ms: dict[str, float],
                 x: torch.Tensor, min_per_stage: int = 1,
                 log: Callable[[str], None] = lambda _: None, lazy: bool = True) -> None:
        self.model = model
        self.units = list(units)
        self.savings_ms = savings_ms
        self.x = x
        self.min_per_stage = min_per_stage
        self.limits = removable_limits(self.units, min_per_stage)
        started = time.perf_counter()
        self.reference = logits_of(_on(model, x.device), x)  # where `x` is: the training device
        self.seconds = time.perf_counter() - started  # spent running models (images/s in the report)
        self.steps: list[Step] = []
        self.evaluations = 0
        self._by_name = {u.name: u for u in self.units}
        self.lazy = lazy  # False: every allowed unit evaluated at every step (what lazy evaluation saves)
        self._kls: list[dict[str, float]] = []  # per step: the KL of the prefix plus each allowed unit evaluated
        self._last_cost: dict[str, tuple[str | None, float]] = {}  # unit: (option it deepened, KL per ms) when last
        self._measured: dict[frozenset[str], float] = {}
        self._log = log

    def set_kl(self, removed: Sequence[Unit]) -> float:
        """KL (nats) of the model with `removed` taken out, from the unpruned model, on the calibration
        images; each set is run once (`evaluations` counts the runs)."""
        key = frozenset(u.name for u in removed)
        if key not in self._measured:
            self.evaluations += 1
            started = time.perf_counter()
            logits = logits_of(remove_units(self.model, removed).to(self.x.device), self.x)
            self._measured[key] = kl_from(self.reference, logits)
            self.seconds += time.perf_counter() - started
        return self._measured[key]

    def kl_of(self, names: Sequence[str]) -> float:
        """set_kl of the units named."""
        return self.set_kl([self._by_name[n] for n in names])

    def single_kl(self) -> dict[str, float]:
        """Each allowed unit's KL when removed alone (the first step's evaluations)."""
        return self._completions(0)

    def evaluated_alone(self) -> dict[str, float]:
        """Each allowed unit's KL when taken alone, where the first step was evaluated (else empty), least KL
        per ms of table saving first: what a report shows of why the order began where it did."""
        kls = self._kls[0] if self._kls else {}
        return dict(sorted(kls.items(), key=lambda kv: (kv[1] / self.savings_ms[kv[0]], self._by_name[kv[0]].order)))

    def _allowed(self, taken: list[Unit]) -> list[Unit]:
        held = {u.path: u for u in taken}
        removed_per_stage: dict[str, int] = {}
        for u in taken:
            if u.removes_block:
                removed_per_stage[u.stage] = removed_per_stage.get(u.stage, 0) + 1

        def allowed(u: Unit) -> bool:
            before = held.get(u.path)
            if self.savings_ms[u.name] <= 0 or (before is not None and not deepens(u, before, self.savings_ms)):
                return False
            adds_a_removal = u.removes_block and not (before is not None and before.removes_block)
            return not adds_a_removal or removed_per_stage.get(u.stage, 0) < self.limits.get(u.stage, 0)

        return [u for u in self.units if allowed(u)]

    def _prefix(self, k: int) -> list[Unit]:
        """The set the first `k` steps take: each block's latest option (a deepening step replaces the one
        before), in the units' order."""
        held: dict[str, Unit] = {}
        for s in self.steps[:k]:
            unit = self._by_name[s.unit]
            held[unit.path] = unit
        return sorted(held.values(), key=lambda u: u.order)

    def _added_ms(self, taken: list[Unit], unit: Unit) -> float:
        """The table saving `unit` adds to `taken` (what it saves, less what the option it replaces saved)."""
        before = next((u for u in taken if u.path == unit.path), None)
        return self.savings_ms[unit.name] - (self.savings_ms[before.name] if before is not None else 0.0)

    @staticmethod
    def _with(taken: list[Unit], unit: Unit) -> list[Unit]:
        """`taken` with `unit` in, replacing the option of its block held before."""
        return sorted([u for u in taken if u.path != unit.path] + [unit], key=lambda u: u.order)

    def _evaluate(self, k: int, units: Sequence[Unit]) -> dict[str, float]:
        """KL of the first `k` steps plus each of `units` (each evaluated once), added to step k's; its dict."""
        taken = self._prefix(k)
        kl_now = self.steps[k - 1].kl if k else 0.0
        held = {u.path: u.name for u in taken}
        kls = self._kls[k]
        for u in units:
            if u.name not in kls:
                kls[u.name] = self.set_kl(self._with(taken, u))
                self._last_cost[u.name] = (held.get(u.path), (kls[u.name] - kl_now) / self._added_ms(taken, u))
        return kls

    def _completions(self, k: int) -> dict[str, float]:
        """KL of the first `k` steps plus the units allowed after them that lazy evaluation tried (all of them at
        the first step, or without `lazy`): in the order of their last KL per ms, until the best one tried costs
        less than the next one's last figure. A unit whose block has been taken since has no last figure."""
        if k < len(self._kls):
            return self._kls[k]
        taken = self._prefix(k)
        allowed = self._allowed(taken)
        self._kls.append({})
        if k == 0 or not self.lazy:
            return self._evaluate(k, allowed)
        held = {u.path: u.name for u in taken}

        def last(u: Unit) -> float:
            before, cost = self._last_cost.get(u.name, (None, -math.inf))
            return cost if u.name in self._last_cost and before == held.get(u.path) else -math.inf

        kl_now = self.steps[k - 1].kl
        best = math.inf
        for u in sorted(allowed, key=lambda u: (last(u), u.order)):
            if last(u) > best:
                break
            kl = self._evaluate(k, [u])[u.name]
            best = min(best, (kl - kl_now) / self._added_ms(taken, u))
        return self._kls[k]

    def extend(self) -> bool:
        """Take one more step; False once nothing more may be removed."""
        k = len(self.steps)
        kls = self._completions(k)
        if not kls:
            return False
        kl_now = self.steps[-1].kl if self.steps else 0.0
        saved = self.steps[-1].saving_ms if self.steps else 0.0
        taken = self._prefix(k)
        added = {n: self._added_ms(taken, self._by_name[n]) for n in kls}
        best = min(kls, key=lambda n: ((kls[n] - kl_now) / added[n], self._by_name[n].order))
        self.steps.append(Step(best, saved + added[best], kls[best]))
        replaced = next((f" in place of {u.name}" for u in taken if u.path == self._by_name[best].path), "")
        self._log(f"  greedy step {k + 1}: {best}{replaced} (KL {kls[best]:.4f} nats, table saving "
                  f"{saved + added[best]:.3f} ms; {len(kls)} sets evaluated)")
        return True

    def choose(self, required_ms: float, below: Collection[str] | None = None,
               exclude: Collection[Collection[str]] = ()) -> Choice | None:
        """The shortest prefix that one more unit (or deepening) brings to `required_ms` (and not to the saving
        of the set `below`), completed by the least-KL such unit, of the sets not in `exclude` (None if no
        allowed set reaches it this way)."""
        excluded = {frozenset(s) for s in exclude}
        below_ms = math.inf if below is None else sum(self.savings_ms[n] for n in below)
        if required_ms <= 0 and frozenset() not in excluded:
            return Choice((), 0.0, 0.0)
        k = 0
        while True:
            saved = self.steps[k - 1].saving_ms if k else 0.0
            if saved >= below_ms:  # every longer prefix saves more still
                return None
            taken = self._prefix(k)
            self._completions(k)
            allowed = self._allowed(taken)
            sets = {u.name: self._with(taken, u) for u in allowed}
            added = {u.name: self._added_ms(taken, u) for u in allowed}
            reaching = [n for n in sets if required_ms <= saved + added[n] < below_ms
                        and frozenset(u.name for u in sets[n]) not in excluded]
            kls = self._evaluate(k, [self._by_name[n] for n in reaching])
            if reaching:
                last = min(reaching, key=lambda n: (kls[n], self._by_name[n].order))
                return Choice(tuple(u.name for u in sets[last]), kls[last], saved + added[last])
            if k == len(self.steps) and not self.extend():
                return None
            k += 1


def least_kl(order: GreedyOrder, proposers: Sequence[Proposer]) -> Proposer:
    """Propose, of the sets that `order` and the other `proposers` put forward for a required saving (less
    than the set `below`'s, none of `exclude`), the one with the least measured KL (order.kl_of; None if none
    reaches the saving).

    The greedy order is myopic: it can strand itself (a block taken by removal cannot be merged, a
    stage at its floor takes no more), and since it prefers units by KL per ms it reaches a large
    saving only with many small units. A knapsack proposes whole sets instead; measuring each
    proposal's KL (one forward pass over the calibration images) keeps the best, and gives every
    proposal the same scale, so a search compares its passes on KL.
    """

    def choose(required_ms: float, below: Collection[str] | None = None, exclude: Collection[Collection[str]] = ()
               ) -> Choice | None:
        best: Choice | None = None
        for propose in (order.choose, *proposers):
            chosen = propose(required_ms, below=below, exclude=exclude)
            if chosen is None:
                continue
            kl = order.kl_of(chosen.removed) if chosen.removed else 0.0
            if best is None or kl < best.importance_lost:
                best = Choice(chosen.removed, kl, chosen.predicted_saving_ms)
        return best

    return choose


def greedy_proposer(order: GreedyOrder, importance: dict[str, float] | None = None) -> Proposer:
    """What `prune --selection greedy` proposes: least_kl over the greedy order, the knapsack over
    each unit's KL when removed alone, and, given a criterion's `importance`, the knapsack over it."""
    units, savings, floor = order.units, order.savings_ms, order.min_per_stage

    def knapsack_over(scores: Callable[[], dict[str, float]]) -> Proposer:
        def propose(required_ms: float, below: Collection[str] | None = None,
                    exclude: Collection[Collection[str]] = ()) -> Choice | None:
            values = scores()
            return choose_units(units, {u.name: values.get(u.name, 0.0) for u in units}, savings, required_ms, floor,
                                below, exclude)

        return propose

    proposers = [knapsack_over(order.single_kl)]
    if importance is not None:
        proposers.append(knapsack_over(lambda: importance))
    return least_kl(order, proposers)
