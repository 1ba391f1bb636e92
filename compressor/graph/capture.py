"""Capture a model as the one module-level graph every later step reads.

torch.export (non-strict) runs the model's Python forward with fake tensors and
records the ATen operations it performs, so models that torch.fx's symbolic
tracer cannot follow (iterating over a tensor's chunks, as YOLO's C2f does;
shape arithmetic, as MobileViT does) are captured too, and every operation
carries the stack of modules it ran in (`nn_module_stack`). The batch
dimension is captured as a symbol, so the graph runs at any batch size.

An ATen graph is too fine for the steps after it, which reason about layers
(fold a BatchNorm into its conv, merge convs, remove a residual branch), so
the calls of torch.nn's own leaf layers (Conv2d, BatchNorm2d, Linear,
LayerNorm, activations, pooling, ...) are lifted back to `call_module` nodes
on the model's own modules; the rest stays ATen operations. Every lift is
checked: the layer, called on the captured input value, must give the
captured output value (LIFT_RTOL). The result is an fx.GraphModule with the
model's own submodules and parameters, like a torch.fx trace, so surgery,
prefix caching, folding and merging read it the same way whichever way it
was captured. torch.fx's symbolic trace is kept as the fallback where export
fails; where both fail, the error names the submodule and the reason in one
line.

No library turns an exported program back into a module-level graph on the
model's own modules (torch.export.unflatten rebuilds the hierarchy but keeps
ATen inside every module), hence this file.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import operator
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, _extract_tensor_metadata

from compressor.errors import InputError, first_line
from compressor.graph.derive import LINEAGE, derive, expanded
from compressor.graph.nodes import attr, has_attr, liftable, outputs_of, remove_dead, tensor_inputs

# |lifted layer - captured ops| <= LIFT_RTOL * max|captured|: the same kernels on the same values, so only a
# different summation order (a fused path chosen for one call and not the other) can move the last bits
LIFT_RTOL = 1e-5
CAPTURE_BATCH = 2  # export specialises a dimension of size 1, so the symbolic batch is captured at 2
CACHE_SIZE = 64  # captured graphs kept per process, by the structure they were captured from
ROOT_PREFIX = "L__self__"


@dataclass
class CaptureInfo:
    """How a graph was captured: "torch.export" or "torch.fx" (and why export failed), in seconds."""

    method: str
    seconds: float
    export_error: str | None = None


def _normalised_stack(stack: dict | None) -> dict[str, tuple[str, str]]:
    """export's nn_module_stack as {call key: (module path, type)}: the key is the path, with "@k" for the k-th
    repeated call of the same module (torch.fx's convention for the first call); the root is left out."""
    out: dict[str, tuple[str, str]] = {}
    for key, value in (stack or {}).items():
        if not isinstance(value, tuple) or len(value) != 2:
            continue
        path, kind = value
        if not path or not isinstance(path, str) or not key.startswith(ROOT_PREFIX):
            continue
        call = key[len(ROOT_PREFIX):]
        out[call] = (path, kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind)))
    return out


def _groups(graph: fx.Graph, paths: dict[str, nn.Module], depth_of_key) -> dict[str, list[fx.Node]]:
    """Nodes grouped by the module call (call key) chosen by `depth_of_key` from each node's stack."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op not in ("call_function", "call_module"):
            continue
        key = depth_of_key(node.meta.get("nn_module_stack") or {})
        if key is not None and key[1] in paths:
            groups.setdefault(key[0], []).append(node)
    return groups


def lift_calls(gm: fx.GraphModule, modules: dict[str, nn.Module], values: dict[str, object] | None,
               pick) -> int:
    """Replace each group of ATen nodes that one call of a module in `modules` (path -> module) produced by a
    `call_module` node, where the call reads one tensor and gives one, and (with `values`: node name ->
    captured value) the module reproduces the captured value within LIFT_RTOL. `pick(stack)` chooses the
    (call key, path) a node belongs to. Returns the number of calls lifted."""
    lifted = 0
    for key, group in _groups(gm.graph, modules, pick).items():
        inputs, outs = tensor_inputs(group), outputs_of(group)
        path = pick(group[0].meta["nn_module_stack"])[1]
        if len(group) == 1 and group[0].op == "call_module" and group[0].target == path:
            continue  # already this module's call
        # several values (a list of tensors, a tuple of metadata: TensorMetadata itself is a NamedTuple)
        if len(inputs) != 1 or len(outs) != 1 or isinstance(outs[0].meta.get("val"), (list, tuple)) \
                or type(outs[0].meta.get("tensor_meta")) in (list, tuple):
            continue
        if values is not None and not _reproduces(modules[path], values, inputs[0], outs[0]):
            continue
        out = outs[0]
        with gm.graph.inserting_before(out):
            call = gm.graph.create_node("call_module", path, (inputs[0],))
        call.meta = {k: v for k, v in out.meta.items() if k in ("val", "tensor_meta")}
        stack = dict(out.meta.get("nn_module_stack") or {})
        keys = list(stack)
        call.meta["nn_module_stack"] = {k: stack[k] for k in keys[: keys.index(key) + 1]} if key in stack else stack
        out.replace_all_uses_with(call)
        if values is not None and out.name in values:
            values[call.name] = values[out.name]  # a later group may read this one's output
        for node in reversed(group):
            if not node.users:
                gm.graph.erase_node(node)
        lifted += 1
    return lifted


@torch.no_grad()
def _reproduces(module: nn.Module, values: dict[str, object], source: fx.Node, out: fx.Node) -> bool:
    x, expected = values.get(source.name), values.get(out.name)
    if not isinstance(x, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return False
    try:
        got = module(x.clone())
    except Exception:  # a layer that cannot be called on its captured input alone is simply not lifted
        return False
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool((got - expected).abs().max() <= LIFT_RTOL * max(scale, 1e-12)) if got.numel() else True


def _innermost_key(stack: dict) -> tuple[str, str] | None:
    if not stack:
        return None
    key = next(reversed(stack))
    return key, stack[key][0]


def record_values(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, object]:
    """Every node's value on `x` (one interpreted forward pass), by node name."""
    values: dict[str, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> object:
            result = super().run_node(n)
            values[n.name] = result.clone() if isinstance(result, torch.Tensor) else result
            return result

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def root_for(graph: fx.Graph, model: nn.Module, fallback: nn.Module) -> dict[str, object]:
    """The attributes the graph's call_module and get_attr nodes name, taken from `model` (so the graph runs
    on the model's own layers and parameters) or, for constants export created, from `fallback`."""
    root: dict[str, object] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[node.target] = model.get_submodule(node.target)
        elif node.op == "get_attr":
            for owner in (model, fallback):
                try:
                    root[node.target] = attr(owner, node.target)
                    break
                except AttributeError:
                    continue
    return root


def _is_view(node: fx.Node) -> bool:
    """Whether a node's value shares memory with one of its inputs (slice, view, transpose, an unbind's item)."""
    if node.target is operator.getitem:
        return True
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    return any(r.alias_info is not None for r in target._schema.returns)


def _functional(gm: fx.GraphModule) -> None:
    """Turn in-place ATen ops (add_, relu_, ...) into their out-of-place forms where nothing else reads the
    tensor they overwrite afterwards, so removing or copying nodes cannot change what another node reads;
    an in-place op on a tensor read later stays (its semantics are kept, as in eager mode)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        schema = target._schema
        if not schema.name.endswith("_") or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        if any(order[u] > order[node] for u in mutated.users if u is not node) or mutated.op == "placeholder" \
                or _is_view(mutated):  # writing into a view writes into the tensor it views, read later maybe
            continue
        base = getattr(torch.ops.aten, schema.name.split("::")[-1][:-1], None)
        overload = getattr(base, target._overloadname, None) if base is not None else None
        if overload is not None:
            node.target = overload


def structure_key(model: nn.Module, shape: tuple[int, ...]) -> str:
    """A digest of what the captured graph depends on: the model's structure (module_digest) and the input
    shape (without the batch dimension)."""
    return _with_shape(module_digest(model), shape)


def _with_shape(digest: str, shape: tuple[int, ...]) -> str:
    return hashlib.sha256(f"{digest}|{tuple(shape)}".encode()).hexdigest()


def module_digest(model: nn.Module) -> str:
    """A digest of every module's path, type, settings, parameter and buffer shapes and plain attributes
    (never the weights' values), and a GraphModule's code."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        plain = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"
                 and isinstance(v, (bool, int, float, str, tuple, type(None)))}
        tensors = [(n, tuple(t.shape), str(t.dtype)) for n, t in [*m.named_parameters(recurse=False),
                                                                 *m.named_buffers(recurse=False)]]
        code = m.code if isinstance(m, fx.GraphModule) else ""
        h.update(f"{name}|{type(m).__module__}.{type(m).__qualname__}|{m.extra_repr()}|{plain}|{tensors}|{code}"
                 .encode())
    return h.hexdigest()


_CACHE: OrderedDict[str, tuple[fx.Graph, CaptureInfo, dict[str, object]]] = OrderedDict()


def capture(model: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """`model` (put in eval mode) as a module-level fx.GraphModule on its own submodules, captured with
    torch.export (torch.fx where export fails), every tensor node's `tensor_meta` set (its batch dimension
    is the capture's, not the example's).

    The graph's `meta["capture"]` is a CaptureInfo. Graphs are cached by the model's structure and input
    shape (not its weights), so capturing a copy of the same architecture again costs no export.
    TraceError (one line, naming the submodule and the reason) where neither can capture it."""
    model.eval()
    shape = tuple(example_input.shape[1:])
    key = structure_key(model, shape)
    cached = _CACHE.get(key)
    if cached is not None:
        _CACHE.move_to_end(key)
        graph, info, constants = copy.deepcopy(cached[0]), cached[1], cached[2]
        gm = fx.GraphModule(root_for(graph, model, ConstantHolder(constants)), graph, type(model).__name__)
    else:
        gm = _derived(model, example_input, shape)
        if gm is None:
            graph, info, constants = _capture_graph(model, example_input)
            gm = fx.GraphModule(root_for(graph, model, ConstantHolder(constants)), graph, type(model).__name__)
            if info.method == "torch.fx":
                _shapes(gm, model, example_input)
            gm.meta["capture"] = info
            gm.meta["constants"] = constants
        _CACHE[key] = (copy.deepcopy(gm.graph), gm.meta["capture"], gm.meta["constants"])
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
        info = gm.meta["capture"]
    gm.meta["capture"] = info
    return gm


def _derived(model: nn.Module, x: torch.Tensor, shape: tuple[int, ...]) -> fx.GraphModule | None:
    """The graph of a model surgery made, derived from its parent's cached graph (derive.py), checked
    against the model on `x`; None where that cannot be done."""
    lineage = getattr(model, LINEAGE, None)
    parent = _CACHE.get(_with_shape(lineage[0], shape)) if lineage else None
    if parent is None:
        return None
    start = time.perf_counter()
    _CACHE.move_to_end(_with_shape(lineage[0], shape))
    constants = dict(parent[2])
    graph = derive(parent[0], model, lineage[1], capture, constants)
    if graph is None:
        return None
    try:
        gm = fx.GraphModule(root_for(graph, model, ConstantHolder(constants)), graph, type(model).__name__)
        with torch.no_grad():
            same = _same_outputs(gm(x), model(x))
    except Exception:  # a derived graph that does not even run is simply not used
        return None
    if not same:
        return None
    gm.meta["capture"] = CaptureInfo(f"derived from its parent's {parent[1].method} graph",
                                     time.perf_counter() - start)
    gm.meta["constants"] = constants
    return gm


def _same_outputs(got: object, expected: object) -> bool:
    a = [t for t in torch.utils._pytree.tree_flatten(got)[0] if isinstance(t, torch.Tensor)]
    b = [t for t in torch.utils._pytree.tree_flatten(expected)[0] if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(p.shape != q.shape for p, q in zip(a, b, strict=True)):
        return False
    return all(float((p - q).abs().max()) <= LIFT_RTOL * max(float(q.abs().max()), 1e-12)
               for p, q in zip(a, b, strict=True) if q.numel())


class ConstantHolder(nn.Module):
    """Constants an exported program created (tensors not on the model), as attributes by their targets."""

    def __init__(self, constants: dict[str, object]) -> None:
        super().__init__()
        self.constants = constants

    def __getattr__(self, name: str) -> object:
        constants = self.__dict__.get("constants") or {}
        if name in constants:
            return constants[name]
        return super().__getattr__(name)


def _shapes(gm: fx.GraphModule, model: nn.Module, x: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as e:
        msg = f"{type(model).__name__} fails on a {list(x.shape)} input: {type(e).__name__}: {first_line(e)}"
        raise InputError(msg) from e


def _capture_graph(model: nn.Module, x: torch.Tensor) -> tuple[fx.Graph, CaptureInfo, dict[str, object]]:
    start = time.perf_counter()
    if isinstance(model, fx.GraphModule):  # a rebuilt block: its own graph, its children captured
        constants: dict[str, object] = {}
        graph = expanded(model, x, capture, constants)
        if graph is not None:
            return graph, CaptureInfo("its own graph, children captured", time.perf_counter() - start), constants
    try:
        graph, constants = _exported_graph(model, x)
        return graph, CaptureInfo("torch.export", time.perf_counter() - start), constants
    except InputError:
        raise
    except Exception as e:  # export raises many types (UserError, GuardOnDataDependentSymNode, TypeError ...)
        export_error = f"{type(e).__name__}: {first_line(e)}"
    from compressor.graph.activations import trace_fx

    gm = trace_fx(model, export_error)
    return gm.graph, CaptureInfo("torch.fx", time.perf_counter() - start, export_error), {}


def _batched(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] >= CAPTURE_BATCH:
        return x[:CAPTURE_BATCH]
    return torch.cat([x] * CAPTURE_BATCH)[:CAPTURE_BATCH]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export logs and warns as it goes (guards, symbolic shapes, a failure it then raises); the
    user sees what capture concludes, in one line, not those."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sink = io.StringIO()  # on a failure export prints the partial graph
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _exported_graph(model: nn.Module, x: torch.Tensor) -> tuple[fx.Graph, dict[str, object]]:
    from torch.export import Dim, export

    xb = _batched(x)
    try:
        with torch.no_grad():
            model(xb)
    except Exception as e:
        msg = f"{type(model).__name__} fails on a {list(x.shape)} input: {type(e).__name__}: {first_line(e)}"
        raise InputError(msg) from e
    with _quiet():
        program = export(model, (xb,), dynamic_shapes=({0: Dim("batch")},), strict=False)
    unlifted = program.module()
    graph = unlifted.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)
    for node in graph.nodes:
        node.meta["nn_module_stack"] = _normalised_stack(node.meta.get("nn_module_stack"))
    _functional(unlifted)
    values = record_values(unlifted, xb)
    leaves = {path: m for path, m in model.named_modules() if path and liftable(m)}
    lift_calls(unlifted, leaves, values, _innermost_key)
    remove_dead(graph)
    for node in graph.nodes:  # keep what later steps read; export's fake values and traces are heavy to copy
        symbolic = isinstance(node.meta.get("val"), torch.SymInt)
        node.meta = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
        if symbolic:
            node.meta["symbolic"] = True
        value = values.get(node.name)
        if isinstance(value, torch.Tensor):
            node.meta["tensor_meta"] = _extract_tensor_metadata(value)
    constants = {n.target: attr(unlifted, n.target) for n in graph.nodes if n.op == "get_attr"
                 and not has_attr(model, n.target)}
    return graph, constants


def clear_cache() -> None:
    """Forget every cached capture (tests that change how capture works)."""
    _CACHE.clear()
