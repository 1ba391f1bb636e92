"""fold_merge.py's results page: the tables and the summary generated from the numbers (step 5 of
fold_merge.py)."""

from __future__ import annotations

import common
from fold_merge_variants import BACKENDS, FLOP_NOTE, TITLE

from compressor.rewrite.compose import MERGE_RTOL
from compressor.rewrite.fold import FOLD_RTOL

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

