"""A torch.export program (.pt2) as a model to export: self-describing, loads without the source code.

A program has no module tree to find units in, so it can be exported and timed, not pruned.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compressor.errors import InputError, first_line
from compressor.models.loaded import LoadedModel


class ProgramModule(nn.Module):
    """An nn.Module running an ExportedProgram's module. The program's module refuses .train() and
    .eval(), so it is held outside the module tree (it is always in inference form), its parameters
    frozen so exporters can trace it."""

    def __init__(self, program: torch.export.ExportedProgram) -> None:
        super().__init__()
        module = program.module()
        for p in module.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "program", module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def _input_shape(program: torch.export.ExportedProgram, path: Path) -> tuple[int, ...]:
    inputs = [n for n in program.graph.nodes if n.op == "placeholder"
              and n.name in program.graph_signature.user_inputs]
    value = inputs[0].meta.get("val") if len(inputs) == 1 else None
    if value is None or value.dim() != 4:
        msg = f"{path}: the program does not take one N x C x H x W image tensor"
        raise InputError(msg)
    return tuple(int(d) for d in value.shape[1:])


def load_program(path: str | Path) -> LoadedModel:
    """A .pt2 file written by torch.export.save (no pickled code runs), as a LoadedModel."""
    path = Path(path)
    if not path.is_file():
        msg = f"program file not found: {path}"
        raise InputError(msg)
    try:
        program = torch.export.load(str(path))
    except Exception as e:  # zipfile.BadZipFile, RuntimeError, ...
        msg = f"{path} is not a torch.export program: {first_line(e)}"
        raise InputError(msg) from e
    shape = _input_shape(program, path)
    model = ProgramModule(program)
    with torch.no_grad():
        out = model(torch.zeros(1, *shape))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        msg = f"{path}: the program's output is not a batch x classes tensor of logits"
        raise InputError(msg)
    return LoadedModel(model, f"program:{path.name}", int(out.shape[1]), shape, f"torch.export program {path}")
