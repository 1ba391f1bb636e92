"""Exporters (nn.Module -> artifact) and runtimes (artifact -> timed session), by name.

Registries map a name to "module:Class" so a backend is imported only when
used: `import compressor` needs only torch.
"""

from __future__ import annotations

import importlib

from compressor.errors import InputError
from exporters.base import Exporter, Runtime, Session

EXPORTERS: dict[str, str] = {
    "onnx": "exporters.onnx:OnnxExporter",
}
RUNTIMES: dict[str, str] = {
    "onnxruntime": "exporters.onnxruntime:OnnxRuntime",
}


def _resolve(registry: dict[str, str], name: str, what: str) -> type:
    if name not in registry:
        msg = f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}"
        raise InputError(msg)
    module, _, cls = registry[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def get_exporter(name: str) -> Exporter:
    return _resolve(EXPORTERS, name, "export format")()


def get_runtime(name: str) -> Runtime:
    return _resolve(RUNTIMES, name, "runtime")()


__all__ = ["EXPORTERS", "RUNTIMES", "Exporter", "Runtime", "Session", "get_exporter", "get_runtime"]
