"""Exporters (nn.Module -> artifact) and runtimes (artifact -> timed session), by name.

A backend is imported only when used (registry.py maps names to "module:Class"),
so `import compressor` needs only torch. This package imports nothing from
compressor but its error classes.
"""

from compressor.errors import MissingBackendError
from exporters.backend import Backend
from exporters.base import Runtime, Session
from exporters.exporter import Exporter
from exporters.registry import EXPORTERS, QUANTIZERS, RUNTIMES, get_exporter, get_quantizer, get_runtime

__all__ = [
    "EXPORTERS", "QUANTIZERS", "RUNTIMES", "Backend", "Exporter", "MissingBackendError", "Runtime", "Session",
    "get_exporter", "get_quantizer", "get_runtime",
]
