"""Stages `probe_int8` and `choose_int8`: precision as a dimension of the measured search.

Whether INT8 pays is a measurement, per runtime and per model. `probe_int8` quantizes the unpruned
model and the most-pruned one with the runtime's own quantizer (compressor/quantize), and times
fp32, INT8 and the INT8 floor in one interleaved measurement: INT8 that is not faster than fp32 (by
more than the search's margin) is declined, with both figures. Otherwise `choose_int8` runs the same
measured search as fp32, in the INT8 frame: every candidate set is exported, re-calibrated and
quantized (a candidate whose INT8 falls below the fidelity floor is refused, not measured, and the
search goes on), then timed interleaved against the unpruned fp32 model, so that a candidate passes
exactly when it meets the target as the final measurement judges it. The target is divided by the
probe's INT8 speedup, so a target that INT8 alone meets needs no removal at all. Of the sets that
pass, the one whose INT8 loses the least (KL on the check images, measured for every candidate) is
kept, as `choose_precision` then compares it with the fp32 search's set.

Why against fp32 and not against the unpruned INT8 model: passing in the INT8 frame would then be the
product of two ratios from different measurements (the probe's and the candidate's), and INT8 timings
swing more than fp32 ones here (efficientnet_lite0 on OpenVINO: the unpruned INT8 model read 2.20 to
2.75 ms across one search while fp32 read 5.0 to 5.2 ms). The search loop still works in the INT8 frame,
whose baseline is taken as this measurement's fp32 latency over the probe's INT8 speedup: passing there
is then the same test as candidate <= fp32 / target.

Fidelity during the search is judged on calibration-split images that calibration does not use
(`check`), never on the held-out split: that one is for the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from compressor.data.bundle import DataBundle
from compressor.errors import FidelityFloorError
from compressor.graph.surgery import remove_units
from compressor.latency.deploy import deployable
from compressor.latency.table import LatencyTable
from compressor.quantize import CALIBRATION_SIZE, QuantizationImages, int8_available, quantize_checked
from compressor.search.knapsack import Choice
from compressor.search.loop import SearchResult, Trial, search_under_target
from compressor.search.target import Measured, Target, meets
from compressor.stages.choose import Chosen, Proposals
from compressor.stages.options import PruneOptions
from compressor.stages.plan import Plan
from compressor.stages.reach import Reach
from compressor.stages.state import RunState

CHECK_IMAGES = 128  # further calibration-split images its fidelity is judged on during the search


def search_images(data: DataBundle, seed: int, calibration: int | None = None) -> QuantizationImages:
    """`calibration` calibration images (None: CALIBRATION_SIZE) and, from the same (calibration) split, check
    images calibration never sees, and after those the selection images a fallback ranks layers on (none where the
    split has no more: then the calibration images; never the check images)."""
    from compressor.quantize.images import SELECTION_SIZE

    calibration = calibration or CALIBRATION_SIZE
    x = torch.cat([b[0] for b in data.loader("train", batch_size=128, seed=seed + 1,
                                             limit=calibration + CHECK_IMAGES + SELECTION_SIZE)]).numpy()
    x, selection = x[:calibration + CHECK_IMAGES], x[calibration + CHECK_IMAGES:]
    split = max(1, min(calibration, len(x) - CHECK_IMAGES // 4))
    return QuantizationImages(x[:split], x[split:], selection=selection if len(selection) else None)


PROBE_STATE = "int8_probe"  # the probe's figures in a run's state: a resumed search stays in their frame


@dataclass
class Int8Probe:
    """INT8 against fp32 on the unpruned and the most-pruned model, from one interleaved measurement (ms)."""

    fp32_ms: float
    int8_ms: float
    int8_floor_ms: float | None  # None: the most-pruned model's INT8 was refused by the fidelity floor, not timed
    speedup: float  # fp32 / int8, unpruned
    declined: str | None  # why INT8 is not searched (None: it is)
    quantizer: dict
    fidelity: dict  # the unpruned INT8 against fp32 on the check images
    floor_refused: str | None = None  # why the most-pruned INT8 was refused (the search then calibrates on fp32's)
    int8_path: Path | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "int8_path"}

    def floor_point(self, reach: Reach) -> Measured:
        """The INT8 search's first calibration point: the most-pruned INT8 against the unpruned INT8, as timed;
        where the most-pruned INT8 was refused, the fraction that removal saved in fp32 (reach.floor) applied
        to the INT8 baseline, a prediction that only ranks (never the unpruned INT8 in its place, which would
        read as "removal saves nothing" and send the search to the most it can remove)."""
        if self.int8_floor_ms is not None:
            return Measured(self.int8_ms, self.int8_floor_ms, reach.floor.spread)
        fraction = reach.floor.candidate_ms / reach.floor.baseline_ms
        return Measured(self.int8_ms, self.int8_ms * fraction, reach.floor.spread)


def _quantize(plan: Plan, model: torch.nn.Module, path: Path, images: QuantizationImages, log: Callable[[str], None]):
    runtime = plan.deployment.runtime.name
    return quantize_checked(deployable(model, plan.example), plan.example, runtime, path, images,
                            opset=plan.deployment.profile.opset, log=lambda s: log(f"    {s}"))


def probe_int8(plan: Plan, reach: Reach, images: QuantizationImages, work: Path, log: Callable[[str], None],
               state: RunState) -> Int8Probe:
    """Quantize and time the unpruned and the most-pruned model; decline INT8 when it is not faster (or when the
    runtime has no INT8 quantizer). A resumed run reuses the saved figures (its INT8 candidates were measured in
    their frame) and quantizes the unpruned model again only for its artifact."""
    runtime = plan.deployment.runtime.name
    if not int8_available(runtime):
        return Int8Probe(0.0, 0.0, None, 0.0, f"{runtime} has no INT8 quantizer here", {}, {})
    suffix = plan.deployment.exporter.suffix
    log(f"INT8: quantizing the unpruned model with {runtime}'s own quantizer")
    try:
        unpruned = _quantize(plan, plan.model, work / f"int8-base{suffix}", images, log)
    except FidelityFloorError as e:
        return Int8Probe(0.0, 0.0, None, 0.0, f"the unpruned model's INT8 is below the fidelity floor ({e})", {}, {})
    saved = state.load(PROBE_STATE)
    if saved is not None:
        state.note_reused("the INT8 probe (fp32 and INT8 of the unpruned and most-pruned models, measured)")
        return Int8Probe(**saved, int8_path=unpruned.path)
    floor_units = [u for u in plan.candidates if u.name in reach.floor_units]
    artifacts, floor_refused = [reach.baseline_path, unpruned.path], None
    try:
        artifacts.append(_quantize(plan, remove_units(plan.model, floor_units, plan.example),
                                   work / f"int8-floor{suffix}", images, log).path)
    except FidelityFloorError as e:
        floor_refused = str(e)
        log("the most-pruned model's INT8 is below the fidelity floor: not timed; the INT8 search calibrates "
            "on the saving removal measured in fp32")
    timed = plan.deployment.time(artifacts, plan.deployment.profile.search_policy)
    fp32, int8 = timed.stats[0].median, timed.stats[1].median
    int8_floor = timed.stats[2].median if floor_refused is None else None
    speedup = fp32 / int8
    declined = None
    if speedup < 1 + reach.margin:
        declined = (f"INT8 is not faster on {plan.deployment.profile.name}: fp32 {fp32:.3f} ms, INT8 {int8:.3f} ms "
                    f"({speedup:.2f}x)")
    log(declined or f"INT8 pays: fp32 {fp32:.3f} ms, INT8 {int8:.3f} ms ({speedup:.2f}x)"
        + (f"; INT8 most pruned {int8_floor:.3f} ms" if int8_floor is not None else ""))
    probe = Int8Probe(fp32, int8, int8_floor, speedup, declined, unpruned.quantizer, unpruned.fidelity.to_dict(),
                      floor_refused, unpruned.path)
    state.save(PROBE_STATE, probe.to_dict())
    return probe


def int8_logits(plan: Plan, artifact: Path, x: np.ndarray) -> torch.Tensor:
    """The INT8 artifact's logits on `x`, the profile's batch at a time (its input shape is static)."""
    from exporters.quantizer import run_batched

    session = plan.deployment.backend.open(artifact)
    return torch.from_numpy(run_batched(session.run, x, plan.deployment.input_shape[0]))


@dataclass
class Int8Search:
    """The INT8 search's outcome: its trials, the best passing one and its fidelity (KL on the check images),
    with each measured set's fp32 baseline (ms, from the same measurement) and KL."""

    result: SearchResult
    removed: tuple[str, ...] | None  # None: no INT8 candidate met the target
    kl: float | None
    refused: list[dict] = field(default_factory=list)
    kls: dict[tuple[str, ...], float] = field(default_factory=dict)
    fp32_ms: dict[tuple[str, ...], float] = field(default_factory=dict)


def check_kl(plan: Plan, logits: torch.Tensor, images: QuantizationImages) -> float:
    """Mean KL(unpruned fp32 || `logits`) over the check images (nats): fidelity lost, on one scale for
    fp32 and INT8 candidates."""
    from compressor.metrics.similarity import kl_per_item
    from compressor.search.greedy import class_logits

    reference = class_logits(plan.model, torch.from_numpy(images.held_out))
    return float(kl_per_item(reference[:len(logits)], logits).mean())


def fp32_kl(plan: Plan, removed: tuple[str, ...], images: QuantizationImages) -> float:
    """check_kl of the fp32 model without `removed` (before fine-tuning, as the INT8 candidates are)."""
    from compressor.search.greedy import class_logits

    chosen = [u for u in plan.candidates if u.name in removed]
    return check_kl(plan, class_logits(remove_units(plan.model, chosen), torch.from_numpy(images.held_out)), images)


def _measurer(plan: Plan, probe: Int8Probe, reach: Reach, images: QuantizationImages, work: Path,
              log: Callable[[str], None], state: RunState, found: Int8Search) -> Callable[[tuple[str, ...]], Measured]:
    """Measures one INT8 candidate against the unpruned fp32 model; gives the loop that measurement in the
    INT8 frame (module docstring) and records the fp32 figure and the check images' KL in `found`."""
    suffix = plan.deployment.exporter.suffix
    saved = state.load("int8_candidates") or {}

    def measure(removed: tuple[str, ...]) -> Measured:
        key = ",".join(removed)
        if "fp32_ms" in saved.get(key, {}):  # older states timed candidates against INT8: measured again
            state.note_reused(f"the measured INT8 candidate without {len(removed)} units")
            found.kls[removed], found.fp32_ms[removed] = saved[key]["kl"], saved[key]["fp32_ms"]
            # in this probe's frame: its own fp32 figure over this probe's INT8 speedup (the same probe, saved)
            return replace(Measured(**saved[key]["measured"]), baseline_ms=saved[key]["fp32_ms"] / probe.speedup)
        chosen = [u for u in plan.candidates if u.name in removed]
        try:
            artifact = _quantize(plan, remove_units(plan.model, chosen, plan.example), work / f"int8-cand{suffix}",
                                 images, log)
        except FidelityFloorError as e:
            found.refused.append({"removed": list(removed), "reason": str(e)})
            log(f"  INT8 candidate -{len(removed)} units refused by the fidelity floor; the search goes on")
            return Measured(probe.int8_ms, float("inf"), 0.0, refused=True)
        m = plan.deployment.time([reach.baseline_path, artifact.path], plan.deployment.profile.search_policy)
        fp32_ms, int8_ms = m.stats[0].median, m.stats[1].median
        measured = Measured(fp32_ms / probe.speedup, int8_ms, m.speedup_spread(), m.stats[1].noisy)
        found.fp32_ms[removed] = fp32_ms
        found.kls[removed] = check_kl(plan, int8_logits(plan, artifact.path, images.held_out), images)
        log(f"  INT8 candidate -{len(removed)} units: {int8_ms:.3f} ms vs fp32 unpruned {fp32_ms:.3f} ms "
            f"({fp32_ms / int8_ms:.2f}x), KL {found.kls[removed]:.4f}")
        saved[key] = {"measured": asdict(measured), "kl": found.kls[removed], "fp32_ms": fp32_ms}
        state.save("int8_candidates", saved)
        return measured

    return measure


def choose_int8(plan: Plan, probe: Int8Probe, reach: Reach, importance: dict[str, float], table: LatencyTable,
                target: Target, images: QuantizationImages, options: PruneOptions, proposer, work: Path,
                log: Callable[[str], None], state: RunState) -> Int8Search:
    """The measured search in the INT8 frame (see the module docstring)."""
    found = Int8Search(SearchResult(None, margin=reach.margin), None, None)
    measure = _measurer(plan, probe, reach, images, work, log, state, found)
    alone = Measured(probe.fp32_ms, probe.int8_ms, reach.floor.spread)
    alone_passes = meets(target, alone, reach.margin)
    if alone_passes:
        log(f"INT8 alone meets {target.describe()} ({probe.speedup:.2f}x): no unit needs to go")
        found.kls[()] = check_kl(plan, int8_logits(plan, probe.int8_path, images.held_out), images)
        found.fp32_ms[()] = probe.fp32_ms
        trial = Trial(Choice((), 0.0, 0.0), table.baseline_ms, alone, True)
        result = SearchResult(trial, [trial], reach.margin)
    else:
        int8_target = target
        if target.speedup is not None:  # in the INT8 frame: what depth must add to INT8's own speedup
            int8_target = Target(speedup=max(target.speedup / probe.speedup, 1 + reach.margin))
        floor_saving = sum(table.savings_ms[n] for n in reach.floor_units)
        log(f"INT8 search for {int8_target.describe()} over the unpruned INT8 model")
        result = search_under_target(plan.candidates, importance, table.savings_ms, table.baseline_ms, int8_target,
                                     measure, reach.margin, (floor_saving, probe.floor_point(reach)),
                                     options.min_blocks_per_stage,
                                     options.max_trials, proposer)
    # among the sets that passed, the one that loses the least, measured (KL on the check images): the
    # loop's own pick is by the criterion's importance, which only estimates that loss
    passing = [t for t in result.trials if t.passed]  # a refused candidate never passes (no latency)
    best = min(passing, key=lambda t: found.kls[t.choice.removed]) if passing else None
    result.best = best
    found.result = result
    found.removed = best.choice.removed if best else None
    found.kl = found.kls.get(best.choice.removed) if best else None
    return found


def _summary(search: Int8Search) -> dict:
    def row(t: Trial) -> dict:
        fp32_ms = search.fp32_ms.get(t.choice.removed)
        timed = fp32_ms is not None and not t.measured.refused
        return {"removed": list(t.choice.removed), "int8_ms": t.measured.candidate_ms if timed else None,
                "fp32_unpruned_ms": fp32_ms, "speedup": fp32_ms / t.measured.candidate_ms if timed else None,
                "kl": search.kls.get(t.choice.removed), "passed": t.passed, "refused": t.measured.refused}

    return {"trials": [row(t) for t in search.result.trials],
            "removed": list(search.removed) if search.removed is not None else None, "kl": search.kl,
            "refused": search.refused}


def choose_precision(plan: Plan, reach: Reach, importance: dict[str, float], table: LatencyTable, target: Target,
                     data: DataBundle, options: PruneOptions, fp32: Chosen | None, proposed: Proposals, work: Path,
                     log: Callable[[str], None], state: RunState) -> Chosen:
    """The (set, precision) pair to deliver: for `auto`, the fp32 search's and the INT8 search's passing
    sets compared by the fidelity they lose on the check images (KL from the unpruned model, before
    fine-tuning); for `int8`, the INT8 search's. INT8 declined by the probe leaves the fp32 choice."""
    from compressor.errors import UnreachableTargetError

    images = search_images(data, options.seed, options.int8_calibration_size)
    probe = probe_int8(plan, reach, images, work, log, state)
    info: dict = {"probe": probe.to_dict(), "check_images": len(images.held_out),
                  "calibration_images": len(images.calibration)}
    if fp32 is not None:  # what depth alone reached, kept even when INT8 is delivered
        best = fp32.search.best
        info["fp32"] = {"removed": [u.name for u in fp32.removed], "passed": best is not None,
                        "speedup": (best or max(fp32.search.trials, key=lambda t: t.measured.speedup)).measured.speedup
                        if fp32.search.trials else None}
    if probe.declined and (options.precision == "auto" or probe.int8_path is None):
        if fp32 is None:
            raise UnreachableTargetError(f"INT8 was asked for, but {probe.declined}" if options.precision == "int8"
                                         else f"{reach.unreachable(target, plan.deployment.profile.name)}, and "
                                              f"{probe.declined}")
        return replace(fp32, int8=info)
    if probe.declined:
        log(f"warning: {probe.declined}; searching INT8 anyway, as --precision int8 asks")
    search = choose_int8(plan, probe, reach, importance, table, target, images, options, proposed.proposer, work,
                         log, state)
    info["search"] = _summary(search)
    if search.removed is None:
        if fp32 is None:
            msg = f"no INT8 candidate meets {target.describe()} above the fidelity floor"
            raise UnreachableTargetError(msg)
        return replace(fp32, int8=info)
    removed = [u for u in plan.candidates if u.name in search.removed]
    int8 = Chosen(removed, search.result, proposed.selection, fp32.calibration if fp32 else None, reach.floor_units,
                  reach.floor, proposed.order, "int8", info, reach.margin_sets)
    if fp32 is None or not fp32.search.best:
        return int8
    info["fp32_kl"] = info["fp32"]["kl"] = fp32_kl(plan, fp32.search.best.choice.removed, images)
    log(f"fidelity lost on {len(images.held_out)} check images: fp32 set KL {info['fp32_kl']:.4f}, "
        f"INT8 set KL {search.kl:.4f}")
    return int8 if search.kl <= info["fp32_kl"] else replace(fp32, int8=info)
