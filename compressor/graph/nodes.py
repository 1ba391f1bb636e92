"""The vocabulary of a captured graph (capture.py): which nodes a set of nodes reads and gives, symbolic
sizes, which layers can be lifted to module calls, attribute paths, dead code."""

from __future__ import annotations

import torch
from torch import fx, nn


def innermost(node: fx.Node) -> tuple[str, str] | None:
    """(call key, module path) of the innermost module a node ran in; None at the model's top level."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key = next(reversed(stack))
    return key, stack[key][0]


def is_symbolic(node: fx.Node) -> bool:
    """A node whose value is a symbolic size (the captured batch), not a tensor."""
    return bool(node.meta.get("symbolic")) or isinstance(node.meta.get("val"), torch.SymInt)


def tensor_inputs(nodes: set[fx.Node] | list[fx.Node]) -> list[fx.Node]:
    """The nodes outside `nodes` whose tensors they read (parameters and symbolic sizes left out), in order."""
    inside = set(nodes)
    found: dict[fx.Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and not is_symbolic(a):
                found[a] = None
    return list(found)


def outputs_of(nodes: set[fx.Node] | list[fx.Node]) -> list[fx.Node]:
    """The nodes of `nodes` whose tensors a node outside them reads, in graph order (a symbolic size computed
    inside and reused later is not an output: any tensor of the batch gives it again)."""
    inside = set(nodes)
    return [n for n in nodes if not is_symbolic(n) and any(u not in inside for u in n.users)]


def liftable(module: nn.Module) -> bool:
    """A torch.nn layer with no children whose forward is torch.nn's own (a subclass that overrides forward,
    e.g. a LayerNorm over channels, may compute something else than its base class's call)."""
    forward = getattr(type(module), "forward", None)
    return (not any(True for _ in module.children()) and forward is not None
            and (getattr(forward, "__module__", None) or "").startswith("torch.nn.modules"))


def attr(owner: nn.Module, target: str) -> object:
    """The dotted attribute `target` of `owner` (AttributeError if it has none)."""
    *parents, name = target.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return getattr(owner, name)


def has_attr(model: nn.Module, target: str) -> bool:
    """Whether `model` has the dotted attribute `target`."""
    try:
        attr(model, target)
    except AttributeError:
        return False
    return True


def remove_dead(graph: fx.Graph) -> None:
    """Erase nodes nothing reads, but never one that writes into its input (fx's own pass lints call_module
    targets against the graph's owner, which a graph on the model's modules does not have yet)."""
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        target = node.target
        if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
            continue
        graph.erase_node(node)


