"""Graph vocabulary shared by finding units, surgery and rewriting: which nodes are residual additions,
which are elementwise activations (as torch.fx or torch.export records them), and torch.fx's trace, the
fallback of capture.py."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
from torch import fx, nn
from torch.utils.hooks import RemovableHandle

from compressor.errors import TraceError, first_line

_ATEN = torch.ops.aten
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, _ATEN.add.Tensor, _ATEN.add_.Tensor}
ADD_METHODS = {"add", "add_"}
ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish",
    nn.GELU: "gelu", nn.Sigmoid: "sigmoid",
}
ACTIVATION_FUNCTIONS = {
    torch.relu: "relu", nn.functional.relu: "relu", nn.functional.relu6: "relu6",
    nn.functional.silu: "silu", nn.functional.hardswish: "hardswish", nn.functional.gelu: "gelu",
    torch.sigmoid: "sigmoid",
    _ATEN.relu.default: "relu", _ATEN.relu_.default: "relu", _ATEN.relu6.default: "relu6",
    _ATEN.silu.default: "silu", _ATEN.silu_.default: "silu", _ATEN.hardswish.default: "hardswish",
    _ATEN.hardswish_.default: "hardswish", _ATEN.gelu.default: "gelu", _ATEN.sigmoid.default: "sigmoid",
}
ACTIVATION_BUILDERS: dict[str, type[nn.Module]] = {v: k for k, v in ACTIVATION_MODULES.items()}
# ops that keep the sign of their input: a ReLU before them still bounds their output
SIGN_PRESERVING_MODULES = (nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                           nn.Dropout)
# post-add activation a is a no-op on inputs produced by activation p: a(p(x)) == p(x)
IDEMPOTENT_AFTER = {("relu", "relu"), ("relu", "relu6"), ("relu6", "relu6")}


class _WhereTracer(fx.Tracer):
    """torch.fx's tracer, remembering which submodule it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.inside: list[str] = []
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward, args, kwargs):
        path = self.path_of_module(m)
        self.inside.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = path
            raise
        finally:
            self.inside.pop()


def trace_fx(model: nn.Module, export_error: str | None = None) -> fx.GraphModule:
    """torch.fx's symbolic_trace (the fallback where torch.export cannot capture the model), with a
    TraceError naming the submodule whose forward could not be traced and why (data-dependent control
    flow, ...); `export_error` is why torch.export failed, said in the same line."""
    tracer = _WhereTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...)
        where = f"submodule {tracer.failed_in!r} ({type(model.get_submodule(tracer.failed_in)).__name__})" \
            if tracer.failed_in else "its forward"
        export = f"torch.export failed with {export_error}; " if export_error else ""
        msg = (f"cannot capture {type(model).__name__}: {export}torch.fx: {where} failed with "
               f"{type(e).__name__}: {first_line(e)}; units are found in a captured graph, so the model's forward "
               "(and its blocks') must not branch on tensor values")
        raise TraceError(msg) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@torch.no_grad()
def eval_pass(model: nn.Module, x: torch.Tensor, hooks: Iterable[RemovableHandle] = ()) -> None:
    """One forward pass of `model` on `x` in eval mode, for what `hooks` record; the model's
    mode is restored and the hooks removed afterwards, also on error."""
    training = model.training
    try:
        model.eval()(x)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()


def activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The activation name a node applies, or None if it is not a known activation."""
    if node.op == "call_module":
        return ACTIVATION_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return ACTIVATION_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def is_add(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in ADD_FUNCTIONS)
            or (node.op == "call_method" and node.target in ADD_METHODS))
