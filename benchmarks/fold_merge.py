"""Latency, FLOPs and accuracy before and after BatchNorm folding and block merging (issue 5).

For each model this script

1. finds the residual units (compressor.graph.units) and asks merge_block to linearise each one
   into a single conv (activations inside the block removed, the trailing one kept); every
   accepted merge is checked against the linearised block on real block inputs (check_merge:
   interior error within 1e-5 of the range, the border ring's error reported);
2. builds the variants: (a) unfolded, exported as is (torch.onnx's TorchScript exporter
   fuses conv -> BN by itself in eval mode: the ONNX BatchNormalization node count says
   whether it did); (b) BN folded (fold_model, checked exact), plus (b+) fold_model with the
   exact conv -> conv merges where it finds any; (c) each accepted unit merged alone, the
   rest folded; (d) all merges that reduce multiply-adds, together; (e) all accepted merges;
3. records per variant FLOPs (2 per multiply-add), ONNX node / Conv / BatchNormalization
   counts and, per backend (ONNX Runtime, OpenVINO), the latency of every variant from ONE
   interleaved measurement (the profile's search policy): speedup vs the folded model and
   the spread of the per-round ratios;
4. for the digits32-trained models: validation accuracy and top-1 agreement with the
   unmerged model for every variant, then after a short distillation fine-tune (teacher =
   the unmerged model) for (d), (e) and --finetune-sample single merges chosen evenly. The
   fine-tune trains the units linearised with their BatchNorms still in place, then merges
   them again (the merged model has no normalisation left and diverges to NaN even at lr
   1e-3); accuracy is measured on the re-merged model, which is what deploys;
5. writes fold_merge.json and .md into --out after every step, with a summary generated
   from the numbers: which merges pay (faster than the folded model by more than the
   measured spread) and which cost time.

Models: resnet56 and mobilenet_v2 trained on digits32 (3x32x32; mobilenet_v2 is trained on
first use and cached, a few minutes), and mobilenet_v2 at 224x224 with random weights and
randomised BatchNorm statistics for latency only (no accuracy: its weights mean nothing).

    .venv/bin/python benchmarks/fold_merge.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
from torch import nn
from torch.nn import functional as F

from compressor.data import DataBundle, load_data
from compressor.errors import InputError, MergeRefused, ValidationError
from compressor.finetune.training import accuracy, train
from compressor.graph.units import Unit, find_units
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.metrics.flops import count_cost
from compressor.models.sources import load_model
from compressor.models.trained import cache_dir
from compressor.models.zoo import build
from compressor.rewrite.block import MergedBlock, check_merge, linearise, merge_block
from compressor.rewrite.compose import MERGE_RTOL
from compressor.rewrite.fold import FOLD_RTOL, fold_model
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


# ---------------------------------------------------------------------------- output


def _f(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _merge_cell(v: dict, units: dict[str, dict]) -> tuple[str, str]:
    """(exact / border, interior / border error) cells of a variant."""
    if not v["units"]:
        return "—", "—"
    rows = [units[n] for n in v["units"]]
    if len(rows) == 1:
        r = rows[0]
        c = r["check"]
        return (f"{'exact' if r['exact'] else 'not exact'}, {r['border']} px",
                f"{c['interior_rel']:.1e} / {c['border_rel']:.2g}")
    n_exact = sum(r["exact"] for r in rows)
    worst_in = max(r["check"]["interior_rel"] for r in rows)
    worst_b = max(r["check"]["border_rel"] for r in rows)
    return (f"{n_exact}/{len(rows)} exact, ≤{max(r['border'] for r in rows)} px",
            f"≤{worst_in:.1e} / ≤{worst_b:.2g}")


def _speed_cell(b: dict, key: str) -> tuple[str, str]:
    row = next(r for r in b["variants"] if r["variant"] == key)
    ms = row["latency_ms"]["median"]
    flag = " (noisy)" if row["latency_ms"]["noisy"] else ""
    if row["verdict"] == "-":
        return f"{ms:.3f}{flag}", "1 (ref)"
    return f"{ms:.3f}{flag}", f"{row['speedup_vs_folded']:.2f} ±{row['speedup_round_spread']:.0%} {row['verdict']}"


def _acc_cell(a: dict | None) -> str:
    if not a:
        return "—"
    return f"{a['accuracy']:.2f} ({a['agreement']:.1f})" + ("" if a.get("finite", True) else " NaN logits")


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def summarise(model: dict) -> list[str]:
    """Plain-language findings generated from the model's numbers."""
    lines = []
    variants = {v["key"]: v for v in model["variants"]}
    base_flops = variants["folded"]["flops"]
    unf = variants["unfolded"]
    onnx_bn = unf.get("onnx", {}).get("batchnorm")
    if onnx_bn is not None:
        lines.append(f"BatchNorm: the model has {unf['info']['batchnorms']} BatchNorm layers; exported unfolded, "
                     f"its ONNX graph has {onnx_bn} BatchNormalization nodes "
                     + ("(torch.onnx fused conv -> BN itself, so the unfolded and folded graphs are the same "
                        "size)" if onnx_bn == 0 else "(the exporter left them for the runtime to fuse)")
                     + f"; folding removed {variants['folded']['info']['folds']} of them in torch.")
    folded_ops = variants["folded"].get("onnx", {}).get("ops")
    same_graph = folded_ops is not None and unf.get("onnx", {}).get("ops") == folded_ops
    for backend, b in model["backends"].items():
        name = BACKENDS.get(backend, backend)
        rows = {r["variant"]: r for r in b["variants"]}
        u = rows["unfolded"]
        parts = [f"{name}: the unfolded export runs at {1 / u['speedup_vs_folded']:.2f}x the folded one's latency "
                 f"(±{u['speedup_round_spread']:.0%}: {u['verdict']}"
                 + ("; the two ONNX graphs have the same nodes, so this difference is the measurement's noise "
                    "floor)" if same_graph else ")")]
        singles = [v for v in model["variants"] if v["kind"] == "single"]
        if singles:
            by = {k: [v["units"][0] for v in singles if rows[v["key"]]["verdict"] == k]
                  for k in ("pays", "costs", "no change")}
            parts.append(f"of {len(singles)} single merges, {len(by['pays'])} pay"
                         + (f" ({_names(by['pays'])})" if by["pays"] else "")
                         + f", {len(by['costs'])} cost time" + (f" ({_names(by['costs'])})" if by["costs"] else "")
                         + f", {len(by['no change'])} within the spread")
        for v in model["variants"]:
            if v["kind"] in ("cheaper", "all", "cheaper+all", "folded_exact"):
                r = rows[v["key"]]
                parts.append(f"{v['label']}: {r['speedup_vs_folded']:.2f}x (±{r['speedup_round_spread']:.0%}, "
                             f"{r['verdict']}) at {v['flops'] / base_flops:.2f}x the FLOPs")
        lines.append("; ".join(parts) + ".")
    macs = model["notes"]
    n = macs["mergeable"]
    if n:
        lines.append(f"FLOPs: {len(macs['cheaper'])} of {n} merges reduce multiply-adds"
                     + ("" if len(macs["cheaper"]) == n else
                        f"; the other {n - len(macs['cheaper'])} add them (a merged kernel is larger than the sum "
                        "of its parts, e.g. one 5x5 has 25/18 = 1.39x the multiply-adds of two 3x3)") + ".")
    for v in model["variants"]:
        if v["kind"] in ("cheaper", "all", "cheaper+all") and v.get("before"):
            before, after = v["before"], v.get("after")
            lines.append(f"Accuracy, {v['label']}: {model['accuracy']:.2f}% unmerged -> "
                         f"{before['linearised']['accuracy']:.2f}% with the activations removed -> "
                         f"{before['accuracy']:.2f}% merged"
                         + (f" -> {after['accuracy']:.2f}% after {after['epochs']} epoch(s) of distillation and "
                            "merging again" if after else " (not fine-tuned)") + ".")
    tuned = [v for v in model["variants"] if v["kind"] == "single" and v.get("after")]
    if tuned:
        lines.append("Fine-tuned single merges (accuracy before -> after): "
                     + ", ".join(f"{v['units'][0]} {v['before']['accuracy']:.2f} -> {v['after']['accuracy']:.2f}"
                                 for v in tuned) + ".")
    return lines


def render_markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        "Variants: (a) exported without folding; (b) BatchNorm folded (fold_model, checked exact); (b+) also the "
        "exact conv -> conv merges fold_model finds; (c) one residual unit linearised and merged into one conv "
        "(activations inside it removed), the rest folded; (d) every merge that reduces multiply-adds; (e) every "
        "merge. Each model x backend is ONE interleaved measurement of all its variants (search policy: at least "
        "50 runs and 1 s per variant, batch 1); 'x vs folded' = median(folded) / median(variant), ± the IQR/median "
        "of the per-round ratios; 'pays' / 'costs' when it is off 1 by more than that spread. Merge error: "
        f"interior (relative, must be ≤ {MERGE_RTOL:g}) / border ring (relative to the interior's range) on real "
        "block inputs. Accuracy: digits32 validation top-1 % (agreement with the unmerged model's top-1 %); "
        f"after FT = {s['epochs']} epoch(s) of distillation (lr {s['lr']}, batch {s['finetune_batch']}, teacher = "
        "unmerged model) of the linearised units with their BatchNorms, then merged again and measured merged.",
        "",
    ]
    for model in result["models"]:
        backends = [b for b in result["settings"]["profiles"] if b in model.get("backends", {})]
        units = {r["unit"]: r for r in model.get("units", [])}
        lines += [f"## {model['model']} ({'x'.join(map(str, model['input_shape']))}, {model['weights']})", ""]
        if model.get("accuracy") is not None:
            lines.append(f"Unmerged validation accuracy {model['accuracy']:.2f}%. ")
        notes = model.get("notes", {})
        if notes:
            refused = [f"{r['unit']}: {r['reason']}" for r in model["units"] if not r["mergeable"]]
            lines.append(f"{len(model['units'])} residual units, {notes['mergeable']} merge, "
                         f"{notes['refused']} refused" + (f" ({'; '.join(refused[:3])})" if refused else "")
                         + f"; {notes['single_merges_timed']} single merges timed.")
        lines += ["", "| variant | FLOPs (M) | vs folded | ONNX nodes (Conv, BN) | "
                  + " | ".join(f"{BACKENDS.get(b, b)} ms | {BACKENDS.get(b, b)} x vs folded" for b in backends)
                  + " | exact, border | error interior / border | acc before (agree) | acc after FT (agree) |",
                  "|---|---:|---:|---:|" + "---:|---:|" * len(backends) + "---|---:|---:|---:|"]
        base_flops = next((v["flops"] for v in model.get("variants", []) if v["kind"] == "folded"), None)
        for v in model.get("variants", []):
            o = v.get("onnx")
            graph = f"{o['nodes']} ({o['conv']}, {o['batchnorm']})" if o else "—"
            cells = []
            for b in backends:
                cells += list(_speed_cell(model["backends"][b], v["key"]))
            ex, err = _merge_cell(v, units)
            lines.append(f"| {v['label']} | {v['flops'] / 1e6:.2f} | {v['flops'] / base_flops:.2f}x | {graph} | "
                         + " | ".join(cells) + (" | " if cells else "")
                         + f"{ex} | {err} | {_acc_cell(v.get('before'))} | {_acc_cell(v.get('after'))} |")
        if model.get("summary"):
            lines += ["", "**Summary.** " + " ".join(model["summary"])]
        lines.append("")
    lines += [
        f"- {FLOP_NOTE}.",
        f"- BatchNorm folding is checked against the unfolded model (max relative error ≤ {FOLD_RTOL:g}); every "
        "export is validated in its runtime against torch (atol 1e-4 + rtol 1e-3 on the logits).",
        "- A merge is exact only away from a border ring when a padded conv follows a biased one (BatchNorm's "
        "shift): the original pads the intermediate map with zeros, the merged conv sees the bias there. "
        "Removing the activations inside the block (linearisation) is what changes accuracy; the merge itself "
        "reproduces the linearised block.",
        "- mobilenet_v2-224 has random weights and randomised BatchNorm statistics: latency and FLOPs only.",
        f"- Noisy measurements are marked (IQR/median above 25% after re-measuring). Total wall time "
        f"{result.get('seconds', 0):.0f} s.",
    ]
    return common.document(TITLE, result, lines)


def write_outputs(result: dict, out: Path) -> None:
    common.write_results(out, NAME, result, render_markdown(result))


# ---------------------------------------------------------------------------- main


def expected_seconds(key: str, singles: int, profiles: list[str], epochs: int, ft_runs: int,
                     pretrained: bool) -> float:
    """Rough run time of one model (s) on a quiet 2-core machine, from COSTS_S."""
    c = COSTS_S[key]
    n = 3 + singles  # unfolded, folded, (d)/(e), the single merges
    seconds = c["fixed"] + n * c["onnx"] + (0 if pretrained else c["pretrain"])
    for p in profiles:
        seconds += n * (c["time"] + (c["openvino"] if p == "openvino-cpu" else 0.0))
    if MODELS[key][2]:  # accuracy of every variant (merged and linearised), fine-tunes
        seconds += 2 * n * c["eval"] + ft_runs * (epochs * c["epoch"] + 2 * c["eval"])
    return seconds


def _pretrained(key: str) -> bool:
    arch, _, trained = MODELS[key]
    bundled = Path(__file__).resolve().parent.parent / "compressor" / "weights" / f"{arch}-{DATA}.pt"
    return not trained or bundled.is_file() or (cache_dir() / f"{arch}-{DATA}.pt").is_file()


def run_model(key: str, args: argparse.Namespace, data: DataBundle, result: dict, workdir: Path) -> None:
    t0 = time.perf_counter()
    subject = prepare(key, data if MODELS[key][2] else None)
    x = torch.randn(1, *subject.input_shape, generator=torch.Generator().manual_seed(0))
    entry: dict = {"model": key, "arch": subject.arch, "input_shape": list(subject.input_shape),
                   "weights": subject.weights, "backends": {}}
    result["models"].append(entry)
    if subject.data is not None:
        check_x = torch.cat([b[0] for b in subject.data.loader("val", batch_size=CHECK_IMAGES, limit=CHECK_IMAGES)])
    else:
        check_x = torch.randn(2, *subject.input_shape, generator=torch.Generator().manual_seed(1))
    units = find_units(subject.model, x)
    rows, merged = analyse_units(subject, units, check_x, x)
    entry["units"] = rows
    variants, notes = build_variants(subject, rows, merged, x, args.limit_units)
    entry["notes"] = notes
    singles = sum(v.kind == "single" for v in variants)
    ft_plan = [v for v in variants if v.kind in ("cheaper", "all", "cheaper+all")]
    ft_plan += evenly([v for v in variants if v.kind == "single"], args.finetune_sample)
    ft_runs = len(ft_plan) if args.epochs > 0 and subject.data is not None else 0
    log(f"[{key}] {len(units)} units, {notes['mergeable']} merge ({notes['refused']} refused), "
        f"{len(notes['cheaper'])} reduce MACs; {len(variants)} variants; expected "
        f"~{expected_seconds(key, singles, args.profiles, args.epochs, ft_runs, True) / 60:.1f} min")
    entry["variants"] = []
    for v in variants:
        cost = count_cost(v.exported, x)
        entry["variants"].append({"key": v.key, "kind": v.kind, "label": v.label, "units": v.units,
                                  "flops": cost.flops, "macs": cost.macs, "params": cost.params, "info": v.info})
    log(f"[{key}] exporting {len(variants)} ONNX graphs")
    onnx_paths = export_onnx(variants, x, workdir / key / "onnx")
    for d, p in zip(entry["variants"], onnx_paths, strict=True):
        d["onnx"] = onnx_counts(p)
    write_outputs(result, args.out)
    for profile_name in args.profiles:
        entry["backends"][profile_name] = time_backend(profile_name, subject, variants, onnx_paths, workdir / key)
        entry["summary"] = summarise(entry)
        write_outputs(result, args.out)
    if subject.data is not None:
        val = subject.data.loader("val")
        reference = predictions(subject.model, val)
        entry["accuracy"] = accuracy(subject.model, val)
        log(f"[{key}] accuracy of {len(variants)} variants before fine-tuning")
        for v, d in zip(variants, entry["variants"], strict=True):
            d["before"] = score(v.model, val, reference)
            if v.units:
                d["before"]["linearised"] = score(with_linearised(subject.model, v.units), val, reference)
            if v.kind == "folded":
                d["before_exported"] = score(v.exported, val, reference)
        entry["summary"] = summarise(entry)
        write_outputs(result, args.out)
        if args.epochs > 0:
            by_key = {d["key"]: d for d in entry["variants"]}
            for i, v in enumerate(ft_plan):
                log(f"[{key}] fine-tuning {v.key} ({i + 1}/{len(ft_plan)}, {args.epochs} epochs)")
                by_key[v.key]["after"] = finetune(subject, v, args.epochs, args.lr, check_x, x)
                entry["summary"] = summarise(entry)
                write_outputs(result, args.out)
    entry["summary"] = summarise(entry)
    entry["seconds"] = time.perf_counter() - t0
    write_outputs(result, args.out)
    for line in entry["summary"]:
        log(f"[{key}] {line}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated, from: " + ", ".join(MODELS) + " (default: all)")
    parser.add_argument("--profiles", default=",".join(BACKENDS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="distillation epochs after merging; 0 skips fine-tuning (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=FT_LR, help="fine-tuning learning rate (default: %(default)s)")
    parser.add_argument("--finetune-sample", type=int, default=4,
                        help="single merges fine-tuned, chosen evenly across stages (default: %(default)s)")
    parser.add_argument("--limit-units", type=int, default=None,
                        help="time at most N single merges, chosen evenly (smoke runs; default: all)")
    args = parser.parse_args(argv)
    args.models = common.known_list(parser, "--models", args.models, MODELS)
    args.profiles = common.known_list(parser, "--profiles", args.profiles, BACKENDS, allow_empty=True)
    if args.epochs < 0 or args.finetune_sample < 0 or (args.limit_units is not None and args.limit_units < 0):
        parser.error("--epochs, --finetune-sample and --limit-units must not be negative")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    total = 0.0
    for key in args.models:
        units = UNITS_GUESS[key]
        singles = units if args.limit_units is None else min(units, args.limit_units)
        # resnet56: no merge reduces MACs, mobilenet_v2: all do; either way one (d)/(e) model to fine-tune
        ft_runs = (1 + min(args.finetune_sample, singles)) if args.epochs > 0 and MODELS[key][2] else 0
        total += expected_seconds(key, singles, args.profiles, args.epochs, ft_runs, _pretrained(key))
    log(f"expected run time: ~{total / 60:.0f} min on a quiet 2-core machine (rough; export, one interleaved "
        f"measurement per model x backend, {args.epochs}-epoch fine-tunes; several times longer on a busy machine"
        + ("" if _pretrained("mobilenet_v2") or "mobilenet_v2" not in args.models else
           ", mobilenet_v2 trained on digits32 first (cached afterwards)") + ")")
    result: dict = {
        **common.provenance(NAME), "torch_threads": torch.get_num_threads(), "flop_convention": FLOP_NOTE,
        "settings": {"models": args.models, "profiles": args.profiles, "epochs": args.epochs, "lr": args.lr,
                     "finetune_batch": FT_BATCH, "finetune_sample": args.finetune_sample,
                     "limit_units": args.limit_units, "data": DATA, "merge_rtol": MERGE_RTOL, "fold_rtol": FOLD_RTOL},
        "models": [],
    }
    data = load_data(DATA)
    with tempfile.TemporaryDirectory(prefix="fold-merge-") as tmp:
        for key in args.models:
            run_model(key, args, data, result, Path(tmp))
            result["seconds"] = time.perf_counter() - t0
            write_outputs(result, args.out)
    common.finish(args.out, NAME, render_markdown(result), t0)
    failed = [f"{m['model']} {r['unit']}" for m in result["models"] for r in m.get("units", [])
              if r.get("check_failed")]
    failed += [f"{m['model']} {v['key']} after fine-tuning" for m in result["models"] for v in m.get("variants", [])
               if v.get("after", {}).get("check_failed")]
    if failed:
        print(f"FAIL: check_merge rejected {', '.join(failed)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
