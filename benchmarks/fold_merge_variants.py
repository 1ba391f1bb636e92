"""fold_merge.py's models and merges: the variants of one model, their ONNX graphs, their timing on one
backend, their accuracy and the distillation fine-tune after merging (the steps 1-4 of fold_merge.py).

Imported by fold_merge.py (the scripts import their siblings as top-level modules).
"""

from __future__ import annotations

import copy
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
from torch import nn
from torch.nn import functional as F

from compressor.data import DataBundle
from compressor.errors import InputError, MergeRefused, ValidationError
from compressor.finetune.training import accuracy, train
from compressor.graph.units import Unit
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.metrics.flops import count_cost
from compressor.models.sources import load_model
from compressor.models.zoo import build
from compressor.rewrite.block import MergedBlock, check_merge, linearise, merge_block
from compressor.rewrite.fold import fold_model
from exporters import get_exporter

NAME = "fold_merge"
TITLE = "Fold and merge: latency, FLOPs and accuracy before and after"
DATA = "digits32"
# model key -> (zoo name, input size, trained on DATA?)
MODELS: dict[str, tuple[str, int, bool]] = {
    "resnet56": ("resnet56", 32, True),
    "mobilenet_v2": ("mobilenet_v2", 32, True),
    "mobilenet_v2-224": ("mobilenet_v2", 224, False),
}
BACKENDS = {"ort-cpu": "ONNX Runtime", "openvino-cpu": "OpenVINO"}
ONNX_OPSET = 17
FT_LR = 0.01
FT_BATCH = 32
CHECK_IMAGES = 16  # validation images whose block inputs check each merge
FLOP_NOTE = "FLOPs = 2 x multiply-adds (torch FlopCounterMode, conv + matmul only), batch 1"
# rough seconds on a quiet 2-core machine, for the expected run time printed at the start (from
# smoke runs here): fixed per model; per variant: fold + ONNX export, OpenVINO export, timing per
# backend, one validation pass; one fine-tuning epoch; first-use training (20 epochs on digits32)
COSTS_S: dict[str, dict[str, float]] = {
    "resnet56": {"fixed": 5, "onnx": 0.6, "openvino": 1.0, "time": 2.0, "eval": 1.2, "epoch": 12, "pretrain": 0},
    "mobilenet_v2": {"fixed": 5, "onnx": 1.0, "openvino": 1.5, "time": 2.0, "eval": 1.5, "epoch": 25,
                     "pretrain": 500},
    "mobilenet_v2-224": {"fixed": 15, "onnx": 3.0, "openvino": 3.0, "time": 3.5, "eval": 0, "epoch": 0,
                         "pretrain": 0},
}
UNITS_GUESS = {"resnet56": 27, "mobilenet_v2": 10, "mobilenet_v2-224": 10}


START = time.perf_counter()


def log(msg: str) -> None:
    """Print `msg` with the seconds since the script started."""
    print(f"[{time.perf_counter() - START:6.0f} s] {msg}", flush=True)


# ---------------------------------------------------------------------------- models and merges


@dataclass
class Subject:
    """A model under test: its torch module (eval, BatchNorm in place) and where it comes from."""

    key: str
    arch: str
    model: nn.Module
    input_shape: tuple[int, int, int]
    weights: str
    data: DataBundle | None  # None: random weights, latency only


@dataclass
class Variant:
    """One model to export and time.

    model: the torch model accuracy is measured on (BatchNorm in place, merges applied);
    exported: what goes to the exporter (folded, except for the unfolded variant).
    """

    key: str
    kind: str  # unfolded | folded | folded_exact | single | cheaper | all | cheaper+all
    label: str
    model: nn.Module
    exported: nn.Module
    units: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)


def prepare(key: str, data: DataBundle | None) -> Subject:
    """The model for `key`: digits32-trained weights (bundled or cached) or random init."""
    arch, size, trained = MODELS[key]
    if trained:
        loaded = load_model(arch, data)
        return Subject(key, arch, loaded.model.eval(), tuple(loaded.input_shape), loaded.source, data)
    model = common.randomise_batchnorm(build(arch, 1000))
    return Subject(key, arch, model, (3, size, size), "random init, BatchNorm statistics randomised", None)


@torch.no_grad()
def block_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named submodule receives when `model` runs on `x`."""
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def record(_: nn.Module, args: tuple) -> None:
            captured[name] = args[0].detach().clone()
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def merge_errors(block: nn.Module, merged: MergedBlock, x: torch.Tensor) -> dict:
    """check_merge on real block inputs `x`: interior error (relative) and border error (abs, relative).

    Where the output is too small to have an interior inside the border ring (mobilenet_v2's
    last stages at 32x32 are 2x2 and 1x1), every pixel is border: the whole-output error is
    reported as the border's, and the interior is checked on a nearest-upsampled copy of `x`.
    """
    try:
        c = check_merge(block, merged, x)
        return {"interior_rel": c.interior_rel, "border_abs": c.border_abs, "border_rel": c.border_rel,
                "tolerance": c.tolerance, "checked_on": list(x.shape)}
    except InputError:
        pass
    reference = linearise(block)(x)
    diff = (merged.module.eval()(x) - reference).abs()
    scale = float(reference.abs().max().clamp_min(1e-12))
    factor = 1
    while True:
        factor *= 2
        big = F.interpolate(x, scale_factor=factor, mode="nearest")
        try:
            c = check_merge(block, merged, big)
            break
        except InputError:
            if factor >= 64:
                raise
    return {"interior_rel": c.interior_rel, "border_abs": float(diff.max()), "border_rel": float(diff.max()) / scale,
            "tolerance": c.tolerance, "checked_on": list(x.shape), "interior_checked_on": list(big.shape),
            "note": f"output {tuple(reference.shape[-2:])} has no interior inside a {merged.border}-pixel ring: "
                    f"border error over the whole output, interior checked on the input upsampled {factor}x"}


def analyse_units(subject: Subject, units: list[Unit], check_x: torch.Tensor,
                  cost_x: torch.Tensor) -> tuple[list[dict], dict[str, MergedBlock]]:
    """merge_block on every unit: accepted merges (checked, with their MAC change) and refusals."""
    model = subject.model
    check_in = block_inputs(model, [u.name for u in units], check_x)
    cost_in = block_inputs(model, [u.name for u in units], cost_x)
    rows, merged = [], {}
    for u in units:
        block = model.get_submodule(u.name)
        row: dict = {"unit": u.name, "kind": u.kind, "stage": u.stage, "order": u.order}
        try:
            mb = merge_block(block)
        except MergeRefused as e:
            rows.append({**row, "mergeable": False, "reason": e.reason})
            continue
        conv = mb.merged.conv
        row.update({"mergeable": True, "exact": mb.exact, "border": mb.border, "notes": list(mb.merged.notes),
                    "kernel": list(conv.kernel_size), "stride": list(conv.stride), "groups": conv.groups,
                    "in_channels": conv.in_channels, "out_channels": conv.out_channels,
                    "activations_removed": len(mb.linearised), "activations_kept": list(mb.post),
                    "block_macs": count_cost(block, cost_in[u.name]).macs,
                    "merged_macs": count_cost(mb.module, cost_in[u.name]).macs})
        try:
            row["check"] = merge_errors(block, mb, check_in[u.name])
        except ValidationError as e:
            rows.append({**row, "mergeable": False, "reason": f"check_merge failed: {e}", "check_failed": True})
            continue
        rows.append(row)
        merged[u.name] = mb
    return rows, merged


def with_merges(model: nn.Module, merges: dict[str, MergedBlock]) -> nn.Module:
    """A copy of `model` with each named unit replaced by its merged conv (+ trailing activations)."""
    out = copy.deepcopy(model).eval()
    for name, mb in merges.items():
        out.set_submodule(name, copy.deepcopy(mb.module))
    return out.eval()


def evenly(items: list, k: int) -> list:
    """Up to `k` items spread evenly over `items` (first and last included when k >= 2)."""
    n = len(items)
    if k <= 0 or n == 0:
        return []
    if k >= n:
        return list(items)
    if k == 1:
        return [items[n // 2]]
    return [items[round(i * (n - 1) / (k - 1))] for i in range(k)]


def build_variants(subject: Subject, rows: list[dict], merged: dict[str, MergedBlock], x: torch.Tensor,
                   limit_units: int | None) -> tuple[list[Variant], dict]:
    """Variants (a)-(e) of the plan, each with its folded export model; and notes on the set."""
    model = subject.model
    folded = fold_model(model, x)
    variants = [
        Variant("unfolded", "unfolded", "(a) unfolded (exported as is)", model, model,
                info={"batchnorms": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())}),
        Variant("folded", "folded", "(b) BN folded", model, folded.model,
                info={"folds": len(folded.folds), "left": folded.left, "max_rel_error": folded.max_rel_error}),
    ]
    exact = fold_model(model, x, merge_exact=True)
    if exact.merges:
        variants.append(Variant("folded+exact", "folded_exact", f"(b+) BN folded + {len(exact.merges)} exact conv "
                                "merges", model, exact.model,
                                info={"merges": [list(p) for p in exact.merges], "max_rel_error": exact.max_rel_error}))
    names = list(merged)
    singles = evenly(names, limit_units) if limit_units is not None else names
    for name in singles:
        m = with_merges(model, {name: merged[name]})
        f = fold_model(m, x)
        variants.append(Variant(f"merge {name}", "single", f"(c) {name}", m, f.model, [name],
                                {"fold_max_rel_error": f.max_rel_error}))
    row = {r["unit"]: r for r in rows}
    cheaper = [n for n in names if row[n]["merged_macs"] < row[n]["block_macs"]]
    notes = {"mergeable": len(names), "refused": sum(not r["mergeable"] for r in rows),
             "single_merges_timed": len(singles), "cheaper": cheaper}
    groups: list[tuple[str, str, list[str]]] = []
    if cheaper and cheaper == names:
        groups.append(("merge all", "cheaper+all", names))
    else:
        if cheaper:
            groups.append(("merge cheaper", "cheaper", cheaper))
        if names:
            groups.append(("merge all", "all", names))
    for key, kind, chosen in groups:
        m = with_merges(model, {n: merged[n] for n in chosen})
        f = fold_model(m, x)
        what = {"cheaper": f"(d) the {len(chosen)} merges that reduce multiply-adds",
                "all": f"(e) all {len(chosen)} merges",
                "cheaper+all": f"(d)=(e) all {len(chosen)} merges (each reduces multiply-adds)"}[kind]
        variants.append(Variant(key, kind, what, m, f.model, list(chosen), {"fold_max_rel_error": f.max_rel_error}))
    return variants, notes


# ---------------------------------------------------------------------------- graphs and latency


def onnx_counts(path: Path) -> dict:
    """Node, Conv and BatchNormalization counts of an ONNX graph, and its conv kernel sizes."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    kernels: Counter = Counter()
    for n in graph.node:
        if n.op_type == "Conv":
            ks = next((list(a.ints) for a in n.attribute if a.name == "kernel_shape"), [])
            kernels["x".join(map(str, ks))] += 1
    return {"nodes": len(graph.node), "conv": ops.get("Conv", 0), "batchnorm": ops.get("BatchNormalization", 0),
            "ops": dict(ops), "conv_kernels": dict(kernels)}


def openvino_counts(xml: Path) -> dict:
    """Layer counts of an OpenVINO IR (before the CPU plugin's own fusions at compile time)."""
    layers = ET.parse(xml).getroot().iter("layer")
    ops = Counter(layer.get("type") for layer in layers)
    return {"layers": sum(ops.values()), "conv": ops.get("Convolution", 0) + ops.get("GroupConvolution", 0),
            "batchnorm": ops.get("BatchNormInference", 0)}


def export_onnx(variants: list[Variant], x: torch.Tensor, workdir: Path) -> list[Path]:
    """Every variant as a validated ONNX file (opset ONNX_OPSET), exported as given: no folding here."""
    exporter = get_exporter("onnx")
    workdir.mkdir(parents=True, exist_ok=True)
    return [exporter.export(v.exported, x, workdir / f"v{i:02d}", ONNX_OPSET) for i, v in enumerate(variants)]


def verdict(speedup: float, spread: float) -> str:
    """'pays' / 'costs' when the speedup is off 1 by more than the per-round spread, else 'no change'."""
    if speedup - 1 > spread:
        return "pays"
    if 1 - speedup > spread:
        return "costs"
    return "no change"


def time_backend(profile_name: str, subject: Subject, variants: list[Variant], onnx_paths: list[Path],
                 workdir: Path) -> dict:
    """Export every variant for the profile's runtime and time all of them in ONE interleaved measurement."""
    profile = load_profile(profile_name)
    dep = Deployment(profile, subject.input_shape)
    reuse = dep.exporter.name == "onnx" and profile.opset == ONNX_OPSET and dep.input_shape == (1, *subject.input_shape)
    if reuse:
        paths = onnx_paths
    else:
        (workdir / profile_name).mkdir(parents=True, exist_ok=True)
        paths = [dep.exporter.export(v.exported, dep.example, workdir / profile_name / f"v{i:02d}", profile.opset)
                 for i, v in enumerate(variants)]
    graph = [openvino_counts(p) if p.suffix == ".xml" else None for p in paths]
    log(f"    {BACKENDS.get(profile_name, profile_name)}: timing {len(paths)} variants interleaved")
    base = next(i for i, v in enumerate(variants) if v.kind == "folded")
    timed = common.time_paths(dep, [v.key for v in variants], paths, profile.search_policy, base=base)
    rows = []
    for i, v in enumerate(variants):
        t = timed[v.key]
        speedup, spread = t["speedup"], t["speedup_round_spread"]
        rows.append({"variant": v.key, "latency_ms": t["latency_ms"], "speedup_vs_folded": speedup,
                     "speedup_round_spread": spread, "verdict": verdict(speedup, spread) if i != base else "-",
                     **({"ir": graph[i]} if graph[i] else {})})
    return {"profile": profile.to_dict(), "policy": "search", "input_shape": list(dep.input_shape),
            "folded_index": base, "variants": rows}


# ---------------------------------------------------------------------------- accuracy


@torch.no_grad()
def predictions(model: nn.Module, loader) -> torch.Tensor:
    """Top-1 class of every validation item, in loader order."""
    model.eval()
    return torch.cat([model(x).argmax(1) for x, _ in loader])


@torch.no_grad()
def score(model: nn.Module, loader, reference: torch.Tensor) -> dict:
    """Validation accuracy (%), top-1 agreement (%) with the unmerged model's predictions, finite logits."""
    model.eval()
    logits = torch.cat([model(x) for x, _ in loader])
    agreement = 100.0 * float((logits.argmax(1) == reference).float().mean())
    return {"accuracy": accuracy(model, loader), "agreement": agreement, "finite": bool(torch.isfinite(logits).all())}


def with_linearised(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `model` with each named unit linearised (activations inside removed, BatchNorm kept)."""
    out = copy.deepcopy(model).eval()
    for name in names:
        out.set_submodule(name, linearise(out.get_submodule(name)))
    return out.eval()


def finetune(subject: Subject, variant: Variant, epochs: int, lr: float, check_x: torch.Tensor,
             x: torch.Tensor) -> dict:
    """Distil the unmerged model into the variant's units linearised (BatchNorm still in place: the merged
    model has no normalisation left and diverged to NaN even at lr 1e-3), then merge them again.

    Returns accuracy and agreement of the re-merged model (what deploys) and of the fine-tuned
    linearised one, the re-merge's worst interior error, and the fine-tuning time (s).
    """
    data = subject.data
    student = with_linearised(subject.model, variant.units)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    train(student, data.loader("train", batch_size=FT_BATCH, shuffle=True, seed=0), epochs, lr,
          teacher=subject.model, desc=f"fine-tune {variant.key}")
    seconds = time.perf_counter() - t0
    merges = {n: merge_block(student.get_submodule(n)) for n in variant.units}
    inputs = block_inputs(student, variant.units, check_x)
    out: dict = {"epochs": epochs, "lr": lr, "batch": FT_BATCH, "seconds": seconds}
    try:
        out["interior_rel_after"] = max(merge_errors(student.get_submodule(n), merges[n], inputs[n])["interior_rel"]
                                        for n in variant.units)
    except ValidationError as e:
        out["check_failed"] = str(e)
    merged = with_merges(student, merges)
    out["fold_max_rel_error"] = fold_model(merged, x).max_rel_error
    val = data.loader("val")
    reference = predictions(subject.model, val)
    return {**score(merged, val, reference), "linearised": score(student, val, reference), **out}


