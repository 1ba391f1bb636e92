"""`compressor score`: every unit scored under several criteria, their rankings compared
(criteria/agreement.py), optionally beside each unit's measured latency saving."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from compressor.criteria import ScoringContext, score_units
from compressor.criteria.agreement import Agreement, agreement, notes_for, rank_units, render_agreement, render_table
from compressor.data.bundle import DataBundle
from compressor.errors import InputError
from compressor.graph.units import find_units_explained
from compressor.latency.profiles import Profile
from compressor.models.loaded import LoadedModel
from compressor.stages.plan import no_units_message


@dataclass
class ScoredModel:
    """What `score_model` found: the JSON-ready report, its text rendering, the agreement itself."""

    report: dict
    text: str
    agreement: Agreement


def _savings(loaded: LoadedModel, units: list, profile: Profile, log: Callable[[str], None]) -> dict[str, float]:
    from compressor.latency.deploy import Deployment
    from compressor.latency.designed import measure_latency_table

    log(f"measuring the latency saving of each unit on {profile.name} (latency model by designed sets)")
    table = measure_latency_table(loaded.model, units, Deployment(profile, loaded.input_shape), loaded.arch)
    return {u.name: table.savings_ms[u.name] for u in units}


def score_model(loaded: LoadedModel, data: DataBundle, criteria: Sequence[str], profile: Profile | None = None,
                k: int | None = None, calibration_size: int = 512, seed: int = 0, repeats: int = 3,
                log: Callable[[str], None] = print, train_device: str = "auto") -> ScoredModel:
    """Score every unit under each criterion (on `train_device`: auto is CUDA when available), optionally
    measure latency savings, compare the rankings."""
    from compressor.compute.context import Compute
    from compressor.compute.device import resolve_device
    from compressor.latency.machine import machine_info

    compute = Compute(resolve_device(train_device), workers=0)

    model = loaded.model.eval()
    units, rejected = find_units_explained(model, loaded.example_input())
    if not units:
        raise InputError(no_units_message(loaded.arch, rejected))
    if k is not None and k > len(units):
        msg = f"--k must be between 1 and the number of units ({len(units)}), got {k}"
        raise InputError(msg)
    calibration = data.loader("train", batch_size=128, limit=calibration_size, seed=seed)
    scores: dict[str, dict[str, float]] = {}
    with compute.placed(model):
        batches = compute.batches(calibration, model)
        if not data.labelled:  # sr_init and taylor read labels: the unpruned model's top-1 instead
            from compressor.finetune.training import teacher_labelled

            batches = teacher_labelled(batches, model)
        for name in criteria:
            log(f"scoring {len(units)} units with {name} on {calibration_size} calibration images "
                f"({compute.describe()})")
            torch.manual_seed(seed)
            with compute.timed(name, len(calibration.dataset)):
                by_unit = score_units(name, ScoringContext(model, units, batches, seed, repeats=repeats))
            scores[name] = {u.name: float(by_unit[u.name]) for u in units}
    savings = _savings(loaded, units, profile, log) if profile is not None else None
    result = agreement(scores, k)
    notes = notes_for(criteria, result)
    report = {
        "model": loaded.arch, "arch": loaded.arch, "data": data.spec, "criteria": list(criteria),
        "calibration_size": calibration_size, "seed": seed, "k": result.k,
        "profile": profile.name if profile else None,
        "units": [{"name": u.name, "kind": u.kind, "stage": u.stage} for u in units],
        "scores": scores, "ranks": {c: rank_units(s) for c, s in scores.items()},
        "latency_saving_ms": savings, "agreement": result.to_dict(), "notes": notes,
        "machine": machine_info(), "compute": compute.to_dict(),
    }
    text = "\n\n".join([render_table(scores, units, savings), render_agreement(result),
                        *(f"Note: {n}" for n in notes)])
    return ScoredModel(report, text, result)
