"""`compressor fold`: exact folds only (BatchNorm into its neighbours, conv pairs merged where exact),
checked against the original, written as model.pt and a BatchNorm-free model.onnx."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from compressor.errors import MergeRefused, ValidationError
from compressor.fileio import check_output_dir, make_output_dir
from compressor.models.checkpoint import save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.rewrite.fold import FOLD_RTOL, fold_model


def fold_job(loaded: LoadedModel, out: str | Path, opset: int = 17) -> tuple[dict, str]:
    """Fold `loaded` into the new folder `out`; returns (summary dict, one-paragraph text)."""
    import onnx

    from exporters import get_exporter

    out = check_output_dir(out, must_be_empty=True)
    x = loaded.example_input()
    result = fold_model(loaded.model.eval(), x, merge_exact=True)
    if result.left:
        reasons = "; ".join(f"{name}: {why}" for name, why in result.left.items())
        raise MergeRefused(f"{len(result.left)} BatchNorm layer(s) cannot be folded exactly: {reasons}")
    out = make_output_dir(out)
    exporter = get_exporter("onnx")
    staging = Path(tempfile.mkdtemp(prefix=".fold.", dir=out))
    try:
        staged = exporter.export(result.model, x, staging / "model.onnx", opset)
        graph = onnx.load(str(staged), load_external_data=False).graph
        if any(node.op_type == "BatchNormalization" for node in graph.node):
            raise ValidationError("the exported ONNX still has BatchNormalization nodes after folding")
        folded = replace(loaded, model=result.model, source=f"folded from {loaded.source}")
        save_checkpoint(out / "model.pt", folded, folded_structure=result.structure,
                        fold_max_rel_error=result.max_rel_error, fold_tolerance_rel=FOLD_RTOL)
        written = [p.name for p in exporter.artifact_files(staged)]
        for name in written:  # the graph file last, each by an atomic rename
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"model": loaded.arch, "source": loaded.source, "batchnorm_folds": len(result.folds),
               "exact_merges": len(result.merges), "max_rel_error": result.max_rel_error,
               "tolerance_rel": FOLD_RTOL, "onnx_batchnorm_nodes": 0, "onnx_opset": opset,
               "input_shape": list(x.shape), "files": [str(out / "model.pt")] + [str(out / n) for n in written]}
    text = (f"{loaded.arch}: folded {len(result.folds)} BatchNorm layers into their neighbouring layers and "
            f"merged {len(result.merges)} conv pairs exactly; the folded model differs from the original by at "
            f"most {result.max_rel_error:.2g} of its output range on a {list(x.shape)} input (tolerance "
            f"{FOLD_RTOL:g}); model.onnx (opset {opset}) has no BatchNormalization node and matches "
            f"torch in ONNX Runtime (atol {exporter.atol:g} + rtol {exporter.rtol:g}); written to {out}.")
    return summary, text
