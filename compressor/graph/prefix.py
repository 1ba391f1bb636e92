"""Prefix caching: capture every unit's block input in one pass, then run only the
part of the network after a unit (its suffix) on a replacement output.

Built on the model's captured graph (capture.py), so it works for any model that
can be captured. Where a unit's suffix also reads values from before the unit (a
long skip), that unit falls back to a full forward pass with the block swapped. A
symbolic batch size the suffix needs is read again from the block's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from compressor.graph.capture import capture
from compressor.graph.nodes import is_symbolic, outputs_of, tensor_inputs
from compressor.graph.surgery import replacement_for
from compressor.graph.units import Unit


def _classifier_input(gm: fx.GraphModule) -> fx.Node | None:
    """The input of the last nn.Linear: the penultimate features. None for a model without one (a
    detector's conv heads): its features are then all its outputs (features_of)."""
    modules = dict(gm.named_modules())
    linears = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)]
    return linears[-1].all_input_nodes[0] if linears else None


def features_of(features: torch.Tensor | None, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Images x features: the penultimate features, flattened; for a model without a classifier layer,
    every output flattened and concatenated (a detector's maps at every scale: a unit that feeds only
    one head still changes the features)."""
    if features is not None:
        return features.flatten(1)
    return torch.cat([o.flatten(1) for o in outputs], 1)


def _symbolic_copy(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node], source: fx.Node) -> bool:
    """Copy a symbolic size node into `graph`, its batch read again from `source` (the new input, whose
    dimension 0 is the batch, the only dimension captured symbolic). False if it is not a size."""
    if node in env:
        return True
    if not is_symbolic(node):
        return False
    if node.target is torch.ops.aten.sym_size.int:
        env[node] = graph.call_function(torch.ops.aten.sym_size.int, (source, 0))
        return True
    if not all(_symbolic_copy(graph, a, env, source) for a in node.all_input_nodes):
        return False
    env[node] = graph.node_copy(node, lambda a: env[a])
    return True


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
        for a in node.all_input_nodes:
            if a in env:
                continue
            if a.op == "get_attr":  # export puts every parameter read at the top of the graph
                env[a] = graph.node_copy(a)
            elif start is not None and is_symbolic(a):
                _symbolic_copy(graph, a, env, env[start])
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
    `logits` is the model's output, or the tuple of its outputs where it has several.
    """

    def __init__(self, model: nn.Module, units: list[Unit], example_input: torch.Tensor) -> None:
        self.model = model.eval()
        self.units = units
        gm = capture(self.model, example_input)
        nodes = list(gm.graph.nodes)
        features = _classifier_input(gm)
        outputs = _output_nodes(gm)
        head = [] if features is None else [features]
        self._heads = len(head)
        self.has_classifier = features is not None  # else the features are all the outputs (features_of)
        self._several = len(outputs) > 1
        self._inputs: dict[str, fx.Node] = {}
        self.suffixes: dict[str, fx.GraphModule | None] = {}
        self.replacements = {u.name: replacement_for(model.get_submodule(u.path), u).eval() for u in units}
        for unit in units:
            block = [n for n in nodes if unit.path in (n.meta.get("nn_module_stack") or {})]
            self._inputs[unit.name] = tensor_inputs(block)[0]
            self.suffixes[unit.name] = _subgraph(gm, outputs_of(block)[0], [*head, *outputs])
        self.prefix = _subgraph(gm, None, [*head, *outputs, *self._inputs.values()])
        self._count = len(outputs)
        modules = dict(gm.named_modules())
        linears = [n.target for n in nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Linear)]
        self._classifier = self.model.get_submodule(linears[-1]) if linears else None

    def _logits(self, values: Sequence[torch.Tensor]) -> torch.Tensor | tuple:
        return tuple(values) if self._several else values[0]

    def _split(self, values: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | tuple]:
        """(features, logits) from a subgraph's (features if any, *outputs)."""
        outputs = values[self._heads:self._heads + self._count]
        return features_of(values[0] if self._heads else None, outputs), self._logits(outputs)

    @torch.no_grad()
    def capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | tuple, dict[str, torch.Tensor]]:
        values = self.prefix(x)
        features, logits = self._split(values)
        inputs = values[self._heads + self._count:]
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
            return self._split(suffix(module(block_input)))
        return self.naive_with_block(unit, module, x)

    @torch.no_grad()
    def naive(self, unit: Unit, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full forward pass of the model with `unit` removed (no caching)."""
        return self.naive_with_block(unit, self.replacements[unit.name], x)

    @torch.no_grad()
    def naive_with_block(self, unit: Unit, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full forward pass of the model with `unit` swapped for `module` (restored afterwards)."""
        original = self.model.get_submodule(unit.path)
        self.model.set_submodule(unit.path, module)
        try:
            return self.full(x)
        finally:
            self.model.set_submodule(unit.path, original)

    @torch.no_grad()
    def full(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of the model as it is now, by a hook on the classifier's input."""
        captured: list[torch.Tensor] = []
        classifier = self._classifier
        if classifier is None:
            logits = self.model(x)
            return features_of(None, torch.utils._pytree.tree_leaves(logits)), logits
        handle = classifier.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        return captured[-1], logits


def _output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The graph's output tensors, flattened (one for a model returning a tensor)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [n for n in leaves if isinstance(n, fx.Node)]


class FeaturesAndOutputs(nn.Module):
    """A captured model returning (features_of its penultimate features or outputs, *its output tensors)."""

    def __init__(self, gm: fx.GraphModule, has_features: bool) -> None:
        super().__init__()
        self.gm, self.has_features = gm, has_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = self.gm(x)
        outputs = values[1:] if self.has_features else values
        return features_of(values[0] if self.has_features else None, outputs), *outputs


def features_and_logits(model: nn.Module, example_input: torch.Tensor) -> FeaturesAndOutputs:
    """`model` as a module returning (its features: features_of, *its output tensors, flattened)."""
    gm = capture(model.eval(), example_input)
    features = _classifier_input(gm)
    return FeaturesAndOutputs(_subgraph(gm, None, [*([] if features is None else [features]), *_output_nodes(gm)]),
                              features is not None)
