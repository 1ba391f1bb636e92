"""compressor: prune PyTorch vision models under a latency target measured on the runtime you deploy to.

    import compressor
    result = compressor.prune(model, data=loader, target=compressor.Speedup(2.0), profile="ort-cpu",
                              out="runs/mine")
    result.model, result.report, result.recipe
    again = compressor.apply_recipe(fresh_model, result.recipe)

The names below load on first use, so `import compressor` needs only torch;
runtimes and exporters are imported when something is exported or timed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute"
_API = {
    "prune": "compressor.jobs.prune:prune",
    "PruneResult": "compressor.jobs.prune:PruneResult",
    "PruneOptions": "compressor.stages.options:PruneOptions",
    "Speedup": "compressor.search.target:Speedup",
    "Latency": "compressor.search.target:Latency",
    "Target": "compressor.search.target:Target",
    "apply_recipe": "compressor.graph.recipe:apply_recipe",
    "find_units": "compressor.graph.units:find_units",
    "remove_units": "compressor.graph.surgery:remove_units",
    "Unit": "compressor.graph.units:Unit",
    "score": "compressor.api:score",
    "export": "compressor.api:export",
    "fold_batchnorm": "compressor.rewrite.fold:fold_batchnorm",
    "Profile": "compressor.latency.profiles:Profile",
    "load_profile": "compressor.latency.profiles:load_profile",
    "load_data": "compressor.data:load_data",
    "load_model": "compressor.models.sources:load_model",
    "load_checkpoint": "compressor.models.checkpoint:load_checkpoint",
    "CompressorError": "compressor.errors:CompressorError",
    "InputError": "compressor.errors:InputError",
    "ValidationError": "compressor.errors:ValidationError",
    "TargetMissedError": "compressor.errors:TargetMissedError",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    if name not in _API:
        msg = f"module 'compressor' has no attribute {name!r}"
        raise AttributeError(msg)
    module, _, attribute = _API[name].partition(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
