"""Architectures by the name a checkpoint stores: a zoo name, timm:NAME, or the user's MODULE:FACTORY.

`build_arch` rebuilds the architecture a checkpoint names, so a pruned user model
reloads from its state_dict and recipe without pickled code.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from torch import nn

from compressor.errors import InputError, first_line
from compressor.models.zoo import ZOO, build

TIMM_PREFIX = "timm:"


def _import_factory(spec: str) -> Callable[[], nn.Module]:
    """The callable named by MODULE:FACTORY (dotted module path, attribute path), with the current folder
    importable, as uvicorn and gunicorn name applications."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        msg = f"--model {spec!r} is not MODULE:FACTORY"
        raise InputError(msg)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: object = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the user's module raises while importing
        msg = f"cannot import {module_name!r} for --model {spec}: {type(e).__name__}: {first_line(e)}"
        raise InputError(msg) from e
    for part in attribute.split("."):
        if not hasattr(target, part):
            msg = f"module {module_name!r} has no attribute {attribute!r} (--model {spec})"
            raise InputError(msg)
        target = getattr(target, part)
    if not callable(target):
        msg = f"{spec} is not callable: --model MODULE:FACTORY names a function or class returning an nn.Module"
        raise InputError(msg)
    return target


def _call_factory(spec: str, factory: Callable[[], object]) -> nn.Module:
    try:
        model = factory()
    except Exception as e:
        msg = f"{spec}() failed: {type(e).__name__}: {first_line(e)}"
        raise InputError(msg) from e
    if not isinstance(model, nn.Module):
        msg = f"{spec}() returned {type(model).__name__}, not a torch.nn.Module"
        raise InputError(msg)
    return model.eval()


def _timm(name: str, num_classes: int | None = None) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        msg = "--model timm:NAME needs timm (`pip install timm`)"
        raise InputError(msg) from e
    options = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=False, **options).eval()
    except Exception as e:  # RuntimeError: unknown model, ...
        msg = f"timm cannot build {name!r}: {first_line(e)}"
        raise InputError(msg) from e


def build_arch(arch: str, num_classes: int | None = None) -> nn.Module:
    """A fresh (untrained) instance of the architecture `arch` names: zoo, timm:NAME or MODULE:FACTORY."""
    if arch in ZOO:
        return build(arch, num_classes or 10)
    if arch.startswith(TIMM_PREFIX):
        return _timm(arch[len(TIMM_PREFIX):], num_classes)
    if ":" in arch:
        return _call_factory(arch, _import_factory(arch))
    msg = f"unknown model {arch!r}; zoo: {', '.join(ZOO)}, or MODULE:FACTORY, timm:NAME, a checkpoint file"
    raise InputError(msg)
