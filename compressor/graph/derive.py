"""The graph of a pruned model, derived from its parent's instead of captured again.

Surgery (surgery.py) replaces submodules of a copy of a model and records on the copy
what it came from: the parent's structure digest and the paths it replaced. Every
candidate the search exports and every model fine-tuned after surgery has that parent,
whose graph is already captured; exporting the candidate again would cost a whole
torch.export (a second or more per model here). Instead, the parent's graph is copied
and each replaced block's nodes are swapped for the graph of what replaced it
(captured on its own: an Identity, a projection, a rebuilt block, each small and
cached by structure). The derived graph is checked against the model itself on the
example input (capture.LIFT_RTOL); where it differs, or the parent is not cached, the
model is captured from scratch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx, nn

from compressor.graph.nodes import attr, has_attr, liftable, outputs_of, remove_dead, tensor_inputs

LINEAGE = "compressor_lineage"  # on a pruned model: (its parent's structure digest, the paths replaced)

Capture = Callable[[nn.Module, torch.Tensor], fx.GraphModule]


def outermost(paths: Sequence[str]) -> list[str]:
    """The paths not inside another of them."""
    return [p for p in dict.fromkeys(paths) if not any(p.startswith(q + ".") for q in paths if q != p)]


def _block_nodes(graph: fx.Graph, path: str) -> list[fx.Node]:
    return [n for n in graph.nodes if path in (n.meta.get("nn_module_stack") or {})]


def _rebased_stack(outer: dict, inner: dict, path: str) -> dict:
    stack = dict(outer)
    for key, (sub_path, kind) in inner.items():
        stack[f"{path}.{key}"] = (f"{path}.{sub_path}", kind)
    return stack


def _inline(graph: fx.Graph, path: str, module: nn.Module, sub: fx.GraphModule | None,
            constants: dict[str, object]) -> bool:
    """Swap the nodes of the call of `path` in `graph` for `sub` (the graph of the module now there; None: the
    module is one liftable layer). False where the call is not one input and one output."""
    nodes = _block_nodes(graph, path)
    if not nodes:
        return False
    inputs, outputs = tensor_inputs(nodes), outputs_of(nodes)
    if len(inputs) != 1 or len(outputs) != 1:
        return False
    outer = {k: v for k, v in (nodes[0].meta.get("nn_module_stack") or {}).items()}
    outer = dict(list(outer.items())[: list(outer).index(path) + 1]) if path in outer else outer
    with graph.inserting_before(nodes[0]):
        if sub is None:
            result = graph.create_node("call_module", path, (inputs[0],))
            result.meta = {"nn_module_stack": outer, "tensor_meta": outputs[0].meta.get("tensor_meta")}
        else:
            result = _copy_nodes(graph, sub, inputs[0], path, module, outer, constants)
    outputs[0].replace_all_uses_with(result)
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)
    return True


def _copy_nodes(graph: fx.Graph, sub: fx.GraphModule, source: fx.Node, path: str, module: nn.Module,
                outer: dict, constants: dict[str, object]) -> fx.Node:
    env: dict[fx.Node, fx.Node] = {}
    result = source
    for node in sub.graph.nodes:
        if node.op == "placeholder":
            env[node] = source
        elif node.op == "output":
            leaves = torch.utils._pytree.tree_flatten(node.args[0])[0]
            result = env[leaves[0]]
        else:
            copied = graph.node_copy(node, lambda a: env[a])
            if node.op == "call_module":
                copied.target = f"{path}.{node.target}"
            elif node.op == "get_attr":
                if has_attr(module, node.target):
                    copied.target = f"{path}.{node.target}"
                else:  # a constant the replacement's capture created
                    name = f"_derived_{len(constants)}"
                    constants[name] = attr(sub, node.target)
                    copied.target = name
            copied.meta = {k: v for k, v in node.meta.items() if k != "nn_module_stack"}
            copied.meta["nn_module_stack"] = _rebased_stack(outer, node.meta.get("nn_module_stack") or {}, path)
            env[node] = copied
    return result


def derive(parent: fx.Graph, model: nn.Module, paths: Sequence[str], capture: Capture,
           constants: dict[str, object]) -> fx.Graph | None:
    """A copy of `parent` with the calls of `paths` swapped for the graphs of `model`'s modules there (captured
    with `capture` on the input shape the parent recorded); None where a call cannot be swapped. Constants
    the replacements' captures created are added to `constants`."""
    import copy

    graph = copy.deepcopy(parent)
    for path in outermost(paths):
        nodes = _block_nodes(graph, path)
        inputs = tensor_inputs(nodes) if nodes else []
        meta = inputs[0].meta.get("tensor_meta") if len(inputs) == 1 else None
        if meta is None:
            return None
        module = model.get_submodule(path)
        sub = None
        if not liftable(module):
            x = torch.randn(*meta.shape, generator=torch.Generator().manual_seed(0))
            sub = capture(module, x)
        if not _inline(graph, path, module, sub, constants):
            return None
    remove_dead(graph)  # parameters only the swapped calls read
    return graph


def expanded(model: fx.GraphModule, x: torch.Tensor, capture: Capture,
             constants: dict[str, object]) -> fx.Graph | None:
    """The graph of a GraphModule (a block surgery rebuilt) with each call of a child that is not one
    torch.nn layer swapped for that child's own captured graph, so its layers are module calls too.
    (torch.export of a GraphModule records only its direct children's calls, not the layers inside.)"""
    import copy

    from torch.fx.passes.shape_prop import ShapeProp

    graph = copy.deepcopy(model.graph)
    shaped = fx.GraphModule(model, graph)
    with torch.no_grad():
        ShapeProp(shaped).propagate(x)
    paths = []
    for node in graph.nodes:
        if node.op == "call_module":
            node.meta["nn_module_stack"] = {node.target: (node.target, type(model.get_submodule(node.target)).__name__)}
            if not liftable(model.get_submodule(node.target)):
                paths.append(node.target)
    return derive(graph, model, paths, capture, constants) if paths else graph
