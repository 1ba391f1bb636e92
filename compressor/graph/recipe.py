"""A recipe: which units a prune removed, merged or slimmed, as plain JSON, to redo on a fresh model.

`apply_recipe(model, recipe)` finds the units of a new instance of the same
architecture by tracing it, checks that every unit the recipe names is there
and of the same kind, and removes (or linearises, or slims) them: the same
structure, ready for the pruned model's state_dict. A width unit's entry records
the exact channels kept (`slim`: per channel group its root layer, channel count
and kept indices), so redoing it on the unpruned weights gives the pruned model
before fine-tuning, channel for channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch
from torch import nn

from compressor.errors import InputError
from compressor.graph.heads import group_size, head_count
from compressor.graph.units import LEVEL_MARK, MERGE_SUFFIX, Slim, Unit

RECIPE_FORMAT = "compressor-recipe"
RECIPE_VERSION = 1


ACTIONS = {"merge": "merge", "width": "slim"}  # a unit kind's action in a recipe; every other kind: "remove"


def _entry(u: Unit) -> dict:
    entry = {"name": u.name, "kind": u.kind, "action": ACTIONS.get(u.kind, "remove"), "becomes": u.removable_to,
             "shortcut": u.shortcut, "post_add": list(u.post_add), "stage": u.stage}
    if u.slim is not None:
        entry["slim"] = {"level": u.slim.level, "groups": [
            {"root": r, "channels": c, "keep": list(k), **({"heads": True} if r in u.slim.head_roots else {})}
            for r, c, k in zip(u.slim.roots, u.slim.channels, u.slim.keep, strict=True)]}
        if u.slim.fill:
            entry["slim"]["fill"] = [{"layer": layer, "means": list(means)} for layer, means in u.slim.fill]
    return entry


def make_recipe(removed: Iterable[Unit], input_shape: Sequence[int]) -> dict:
    """The JSON-ready recipe of `removed` units; `input_shape` (C, H, W) is the traced input."""
    return {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "input_shape": list(input_shape),
            "units": [_entry(u) for u in removed]}


def _slim(entry: dict) -> Slim:
    """A width entry's Slim; InputError where it is not one."""
    raw = entry.get("slim")
    groups = raw.get("groups") if isinstance(raw, dict) else None
    ok = isinstance(groups, list) and groups and all(
        isinstance(g, dict) and isinstance(g.get("root"), str) and isinstance(g.get("channels"), int)
        and isinstance(g.get("keep"), list) and g["keep"] and all(isinstance(k, int) and 0 <= k < g["channels"]
                                                                   for k in g["keep"])
        and len(set(g["keep"])) == len(g["keep"]) < g["channels"] for g in groups)
    if not ok:
        msg = (f"recipe entry {entry.get('name')!r} of kind width needs "
               f"'slim': {{groups: [{{root, channels, keep}}]}}, "
               "each keeping fewer than all of its channels by distinct indices")
        raise InputError(msg)
    level = raw.get("level", 0.0)
    level = float(level) if isinstance(level, (int, float)) else 0.0
    fill = raw.get("fill", [])
    if not (isinstance(fill, list) and all(
            isinstance(f, dict) and isinstance(f.get("layer"), str) and isinstance(f.get("means"), list)
            and all(isinstance(v, (int, float)) for v in f["means"]) for f in fill)):
        msg = (f"recipe entry {entry.get('name')!r}: 'slim.fill' must be a list of {{layer, means}}, "
               "a layer's path in the block and the mean of each of its input channels")
        raise InputError(msg)
    return Slim(tuple(g["root"] for g in groups), tuple(g["channels"] for g in groups),
                tuple(tuple(sorted(g["keep"])) for g in groups), level,
                fill=tuple((f["layer"], tuple(float(v) for v in f["means"])) for f in fill))


def width_units(entries: list[dict], units: list[Unit], model: nn.Module) -> list[Unit]:
    """The recipe's width units on `model`, each slimming the block or branch unit its name extends (found
    by tracing, in `units`) at the recipe's channels; InputError where the model has no such unit or layer."""
    by_name = {u.name: u for u in units}
    found = []
    for entry in entries:
        base = by_name.get(entry["name"].partition(LEVEL_MARK)[0])
        if base is None or base.kind not in ("identity", "projection", "branch"):
            msg = (f"the model has no block or branch {entry['name'].partition(LEVEL_MARK)[0]!r} for the recipe's "
                   f"width unit {entry['name']}; its units: {', '.join(by_name) or 'none'}")
            raise InputError(msg)
        slim = _slim(entry)
        block = model.get_submodule(base.path)
        for root, channels in zip(slim.roots, slim.channels, strict=True):
            layer = dict(block.named_modules()).get(root)
            have = group_size(layer) if layer is not None else None
            if have != channels:
                msg = (f"the recipe slims {root} of {base.path} from {channels} channels (heads of an attention), "
                       "but the model's "
                       f"{'has ' + str(have) if layer is not None else 'has no such layer'}")
                raise InputError(msg)
        heads = tuple(r for r in slim.roots if head_count(block.get_submodule(r)) is not None)  # the model says
        found.append(Unit(entry["name"], "width", base.stage, base.order, base.shortcut,
                          input_shape=base.input_shape, members=base.members, slim=replace(slim, head_roots=heads)))
    return found


def recipe_units(recipe: dict) -> list[str]:
    """The unit names a recipe removes or merges; InputError if it is not a recipe."""
    if not isinstance(recipe, dict) or recipe.get("format") != RECIPE_FORMAT:
        msg = f"not a compressor recipe (no {RECIPE_FORMAT!r} format field)"
        raise InputError(msg)
    if recipe.get("version") != RECIPE_VERSION:
        msg = f"recipe version {recipe.get('version')!r} is not supported (this compressor reads {RECIPE_VERSION})"
        raise InputError(msg)
    units = recipe.get("units")
    if not isinstance(units, list) or not all(isinstance(u, dict) and isinstance(u.get("name"), str)
                                              for u in units):
        msg = "recipe 'units' must be a list of {name, kind, ...} entries"
        raise InputError(msg)
    return [u["name"] for u in units]


def apply_recipe(model: nn.Module, recipe: dict, example_input: torch.Tensor | None = None) -> nn.Module:
    """A copy of `model` (a fresh instance of the architecture the recipe was made on) with the
    recipe's units removed, merged or slimmed (to the exact channels recorded). `example_input` defaults to
    a random tensor of the recipe's input shape; InputError names any unit the model does not have, or has
    of another kind."""
    from compressor.graph.surgery import remove_units
    from compressor.graph.units import find_units

    names = recipe_units(recipe)
    if example_input is None:
        shape = recipe.get("input_shape")
        example_input = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    if not names:
        return remove_units(model, [])
    units = find_units(model, example_input)
    if any(name.endswith(MERGE_SUFFIX) for name in names):
        from compressor.graph.merge_units import with_merge_units

        units = with_merge_units(model, units)
    units = units + width_units([u for u in recipe["units"] if u.get("kind") == "width"], units, model)
    by_name = {u.name: u for u in units}
    missing = [n for n in names if n not in by_name]
    if missing:
        msg = (f"the model has no removable unit {', '.join(missing)} that the recipe names; "
               f"its units: {', '.join(u.name for u in units) or 'none'}")
        raise InputError(msg)
    kinds = [f"{u['name']} is {by_name[u['name']].kind}, the recipe says {u['kind']}"
             for u in recipe["units"] if u.get("kind", by_name[u["name"]].kind) != by_name[u["name"]].kind]
    if kinds:
        msg = f"the model does not match the recipe: {'; '.join(kinds)}"
        raise InputError(msg)
    return remove_units(model, [by_name[n] for n in names], example_input)
