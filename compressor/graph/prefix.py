"""Prefix caching: capture every unit's block input in one pass, then run only the
part of the network after a unit (its suffix) on a replacement output.

Built on the model's fx graph, so it works for any traceable model. Where a
unit's suffix also reads values from before the unit (a long skip), that unit
falls back to a full forward pass with the block swapped.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from compressor.graph.activations import trace
from compressor.graph.surgery import replacement_for
from compressor.graph.units import Unit


def _classifier_input(gm: fx.GraphModule) -> fx.Node:
    """The input of the last nn.Linear: the penultimate features. Else the output itself."""
    modules = dict(gm.named_modules())
    output = _output_node(gm)
    linears = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)]
    return linears[-1].all_input_nodes[0] if linears else output


def _subgraph(gm: fx.GraphModule, start: fx.Node | None, outputs: list[fx.Node]) -> fx.GraphModule | None:
    """A GraphModule computing `outputs` from `start` (a new placeholder) or from the model input."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    nodes = list(gm.graph.nodes)
    begin = 0
    if start is not None:
        env[start] = graph.placeholder("block_output")
        begin = nodes.index(start) + 1
    needed = set(outputs)
    for node in nodes[begin:]:
        if node.op == "output":
            break
        if node.op == "placeholder" and start is not None:
            continue
        missing = [a for a in node.all_input_nodes if a not in env]
        if missing:
            if node in needed or any(u in needed for u in node.users):
                return None
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    if any(o not in env for o in outputs):
        return None
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(gm, graph)


class SuffixRunner:
    """Runs "the model with one unit removed" from cached block inputs.

    capture(x) -> (features, logits, {unit: block input}) in one pass;
    removed(unit, block_input) -> (features, logits) of the model without `unit`.
    """

    def __init__(self, model: nn.Module, units: list[Unit]) -> None:
        self.model = model.eval()
        self.units = units
        gm = trace(self.model)
        nodes = list(gm.graph.nodes)
        features = _classifier_input(gm)
        output = _output_node(gm)
        self._inputs: dict[str, fx.Node] = {}
        self.suffixes: dict[str, fx.GraphModule | None] = {}
        self.replacements = {u.name: replacement_for(model.get_submodule(u.name), u).eval() for u in units}
        for unit in units:
            block = [n for n in nodes if unit.name in (n.meta.get("nn_module_stack") or {})]
            inside = set(block)
            block_input = next(a for n in block for a in n.all_input_nodes if a not in inside)
            block_output = next(n for n in block if any(u not in inside for u in n.users))
            self._inputs[unit.name] = block_input
            self.suffixes[unit.name] = _subgraph(gm, block_output, [features, output])
        self.prefix = _subgraph(gm, None, [features, output, *self._inputs.values()])
        modules = dict(gm.named_modules())
        linears = [n.target for n in nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)]
        self._classifier = self.model.get_submodule(linears[-1]) if linears else None

    @torch.no_grad()
    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        features, logits, *inputs = self.prefix(x)
        return features, logits, dict(zip(self._inputs, inputs, strict=True))

    @torch.no_grad()
    def removed(self, unit: Unit, block_input: torch.Tensor,
                x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits without `unit`; `x` (the model input) is used only by the fallback."""
        return self.with_block(unit, self.replacements[unit.name], block_input, x)

    @torch.no_grad()
    def with_block(self, unit: Unit, module: nn.Module, block_input: torch.Tensor,
                   x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and logits with `unit` replaced by `module`, run from the cached block input."""
        suffix = self.suffixes[unit.name]
        if suffix is not None:
            return suffix(module(block_input))
        return self.naive_with_block(unit, module, x)

    @torch.no_grad()
    def naive(self, unit: Unit, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full forward pass of the model with `unit` removed (no caching)."""
        return self.naive_with_block(unit, self.replacements[unit.name], x)

    @torch.no_grad()
    def naive_with_block(self, unit: Unit, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full forward pass of the model with `unit` swapped for `module` (restored afterwards)."""
        original = self.model.get_submodule(unit.name)
        self.model.set_submodule(unit.name, module)
        try:
            return self.full(x)
        finally:
            self.model.set_submodule(unit.name, original)

    @torch.no_grad()
    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of the model as it is now, by a hook on the classifier's input."""
        captured: list[torch.Tensor] = []
        classifier = self._classifier
        if classifier is None:
            logits = self.model(x)
            return logits, logits
        handle = classifier.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return captured[-1], logits


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def features_and_logits(model: nn.Module) -> fx.GraphModule:
    """`model` as a module returning (penultimate features, logits)."""
    gm = trace(model.eval())
    return _subgraph(gm, None, [_classifier_input(gm), _output_node(gm)])
