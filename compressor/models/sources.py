"""`--model` specs: what a user names, turned into a LoadedModel.

    resnet56, efficientnet_lite0 ...   a zoo name (zoo.py; trained here on the data, or its own weights)
    vit_digits, det_digits             zoo names whose weights, trained here, ship with the package
    runs/r56/model.pt                  a checkpoint written by compressor (checkpoint.py)
    mynet:build                        the user's own code: MODULE:FACTORY, a function or class returning
                                       the nn.Module (the current folder is importable), weights from --weights
    timm:resnet18                      a timm architecture (timm installed; weights only from --weights)
    model.pt2                          a torch.export ExportedProgram (export only: it has no module tree)

"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from compressor.errors import InputError, first_line
from compressor.models.architectures import TIMM_PREFIX, build_arch
from compressor.models.checkpoint import check_state_dict, load_checkpoint, load_tensors_file
from compressor.models.loaded import LoadedModel
from compressor.models.trained import default_weights, pretrained_on
from compressor.models.zoo import ZOO, build, load_pretrained


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a state_dict file into `model` with weights_only=True and strict=True; InputError naming
    missing and unexpected keys, mismatched shapes, or non-finite values."""
    from compressor.models.checkpoint import CHECKPOINT_FORMAT

    state = load_tensors_file(path, "weights file", "state_dict")
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = state["state_dict"]
    check_state_dict(state, path)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}" if missing else "",
                 f"unexpected keys {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}"
                 if unexpected else "", f"wrong shapes {'; '.join(shapes[:3])}" if shapes else ""]
        msg = f"{path} does not fit the model: {'; '.join(p for p in parts if p)}"
        raise InputError(msg)
    model.load_state_dict(state, strict=True)


def _num_classes(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Classes from the model's output on one random input: those of its first 2-D (batch x classes) output;
    0 for a model without one (a detector's maps; any structure of tensors is taken)."""
    try:
        with torch.no_grad():
            out = model.eval()(torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)))
    except Exception as e:
        msg = f"the model fails on a 1x{'x'.join(map(str, input_shape))} input: {type(e).__name__}: {first_line(e)}"
        raise InputError(msg) from e
    from compressor.metrics.outputs import named_outputs

    outputs = named_outputs(out)
    logits = [t for t in outputs.values() if t.dim() == 2]
    return int(logits[0].shape[1]) if logits else 0


def from_module(model: nn.Module, input_shape: tuple[int, int, int], arch: str | None = None,
                source: str | None = None) -> LoadedModel:
    """The user's own nn.Module as a LoadedModel; `arch` is what rebuilds it (MODULE:FACTORY); by default
    its class as MODULE:CLASS, which a checkpoint rebuilds by calling the class with no arguments."""
    if not isinstance(model, nn.Module):
        msg = f"expected a torch.nn.Module, got {type(model).__name__}"
        raise InputError(msg)
    shape = tuple(int(d) for d in input_shape)
    name = arch or f"{type(model).__module__}:{type(model).__qualname__}"  # MODULE:CLASS rebuilds it
    return LoadedModel(model.eval(), name, _num_classes(model, shape), shape, source or f"user module {name}")


def _zoo(spec: str, data: object | None) -> LoadedModel:
    entry = ZOO[spec]
    if entry.pretrained is not None:
        return load_pretrained(spec)
    if data is None and entry.trained_on is not None:
        return default_weights(spec)
    if data is None:
        size = entry.input_size
        return LoadedModel(build(spec, 10), spec, 10, (3, size, size), f"{spec} (untrained)")
    if not data.labelled and data.spec != entry.trained_on:
        if entry.trained_on is not None:
            msg = (f"{spec}'s weights are trained on {entry.trained_on} and {data.spec} has no labels to train it "
                   f"on; use --data {entry.trained_on}, or a checkpoint")
            raise InputError(msg)
        pretrained = ", ".join(n for n, e in ZOO.items() if e.pretrained is not None or e.trained_on)
        msg = (f"{spec} has no pretrained weights here and {data.spec} has no labels to train it on; "
               f"use a model with its own weights ({pretrained}) or a checkpoint")
        raise InputError(msg)
    return pretrained_on(spec, data)


def _native_input(model: nn.Module) -> tuple[int, int, int] | None:
    """The input shape an architecture declares for itself (timm's pretrained_cfg["input_size"]), if any."""
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    return tuple(int(d) for d in size) if isinstance(size, (tuple, list)) and len(size) == 3 else None


def _user(spec: str, data: object | None, weights: str | None, input_shape: tuple[int, int, int] | None
          ) -> LoadedModel:
    model = build_arch(spec)
    shape = input_shape or (tuple(data.input_shape) if data is not None else None) or _native_input(model)
    if shape is None:
        msg = f"--model {spec}: give --input-shape C,H,W or --data, so the input shape is known"
        raise InputError(msg)
    if weights:
        load_weights(model, weights)
    return from_module(model, shape, arch=spec, source=f"{spec}" + (f" with weights {weights}" if weights else
                                                                    " (its initial weights)"))


def load_model(spec: str, data: object | None = None, weights: str | None = None,
               input_shape: tuple[int, int, int] | None = None) -> LoadedModel:
    """The model `spec` names (see the module docstring), fitted to `data` where given.

    With `data`: a model that expects a fixed normalisation (ImageNet-pretrained lineage) first
    asks the data to fit its resolution and normalisation (photos and imagefolder rebuild
    themselves); then the model must take the data's input shape (InputError otherwise).
    """
    path = Path(spec)
    if spec in ZOO and weights and ZOO[spec].pretrained is None:  # the user's weights: nothing to train
        classes = data.num_classes if data is not None and data.labelled else 10
        size = data.input_shape if data is not None else (3, ZOO[spec].input_size, ZOO[spec].input_size)
        loaded = LoadedModel(build(spec, classes), spec, classes, tuple(size), f"{spec} with weights {weights}")
    elif spec in ZOO:
        loaded = _zoo(spec, data)
    elif path.is_dir():
        msg = f"--model {spec} is a folder; give a checkpoint file (such as {path / 'model.pt'}) or a zoo name"
        raise InputError(msg)
    elif spec.endswith(".pt2"):
        from compressor.models.program import load_program

        loaded = load_program(spec)
    elif spec.endswith((".pt", ".pth")) or path.is_file():
        loaded = load_checkpoint(spec)
    elif spec.startswith(TIMM_PREFIX) or (":" in spec and os.sep not in spec):
        loaded = _user(spec, data, weights, input_shape)
    else:
        msg = f"unknown model {spec!r}; zoo: {', '.join(ZOO)}, or MODULE:FACTORY, timm:NAME, a checkpoint file"
        raise InputError(msg)
    if weights and loaded.arch in ZOO:
        load_weights(loaded.model, weights)
    if data is not None:
        _fit_data(loaded, data)
    return loaded


def _fit_data(loaded: LoadedModel, data: object) -> None:
    """Rebuild `data` for the model where it can; refuse a data source the model cannot take."""
    if loaded.preprocessing is not None:
        data.fit_to(loaded.input_shape[1], loaded.preprocessing)
        if data.labelled and data.num_classes > loaded.num_classes:
            msg = (f"{data.spec} has {data.num_classes} classes, {loaded.arch} predicts {loaded.num_classes}: "
                   "labels must be the model's class indices")
            raise InputError(msg)
    if tuple(loaded.input_shape) != tuple(data.input_shape):
        msg = f"model expects inputs {loaded.input_shape}, data {data.spec} gives {tuple(data.input_shape)}"
        raise InputError(msg)
