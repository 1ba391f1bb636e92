"""Random residual architectures: unit finding, surgery, BatchNorm folding and ONNX export on N nets.

For each seed, tests/random_nets.py builds a random residual classifier (identity and projection
shortcuts, pre- and post-activation, five activations, squeeze-excite, `+` / `torch.add` / `+=`,
nested Sequentials, two-addition blocks, stochastic depth, odd channels and strides; with
`--families transformer,split_concat` also pre-norm transformer blocks with two residual branches,
LayerNorm and attention, on tokens or maps, and YOLO C2f / C3 split-concat blocks), a random subset of
its units (blocks, branches, and blocks whose branches are all units) is removed, and three checks run:

1. surgery: the pruned model equals the same net with those branches muted, within 1e-5 of the
   output range (removal is exact; only fp32 summation order may differ);
2. folding: BatchNorm folded into the pruned model changes it by at most FOLD_RTOL (1e-4 of the range);
3. export: the folded model's ONNX, run in ONNX Runtime, equals the muted reference within the
   ONNX exporter's tolerance (atol 1e-4 + rtol 1e-3).

A mismatch is any check failing, or any step raising. The count of mismatches is the result (goal 0).

With `--moves depth+width`, about half of the blocks whose inner channels slim (graph/width.py) are slimmed
to a random level keeping random channels, half of those reading their dropped channels as random means
(Slim.fill), and a random subset of the other blocks is removed; the reference is the net with those
branches muted and the dropped channels zeroed, or set to their means, where dense layers read them
(tests/width_reference.py), for all three checks.

    .venv/bin/python benchmarks/random_architectures.py --nets 1000
    .venv/bin/python benchmarks/random_architectures.py --nets 1000 --families transformer,split_concat
    .venv/bin/python benchmarks/random_architectures.py --nets 1000 --moves depth+width

The nets are independent: on N cores, run N processes over disjoint seed ranges (`--first-seed`, each
with its own `--out`), then `--merge` their JSON files into one table.

    .venv/bin/python benchmarks/random_architectures.py --merge /tmp/a/X.json /tmp/b/X.json
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import common
import numpy as np
import torch

sys.path.insert(0, str(common.HERE.parent))  # tests/random_nets.py, the generator the test suite uses

from compressor.graph.heads import head_count  # noqa: E402
from compressor.graph.surgery import remove_units  # noqa: E402
from compressor.graph.units import find_units  # noqa: E402
from compressor.rewrite.fold import FOLD_RTOL, check_equivalent, fold_batchnorm  # noqa: E402
from exporters import get_exporter  # noqa: E402
from tests.random_nets import EXTRA_FAMILIES, muted_reference, random_net  # noqa: E402

SURGERY_RTOL = 1e-5


def _width_moves(net, units: list, rng: random.Random) -> tuple[list, list]:
    """(width units on about half the blocks that slim, removals among the other whole blocks)."""
    from compressor.graph.width import find_width_options
    from tests.width_reference import random_widths

    widths = random_widths(find_width_options(net.model, units)[0], rng, net.model)
    slimmed = {u.path for u in widths}
    blocks = [u for u in units if u.path not in slimmed and u.kind in ("identity", "projection")]
    return widths, [u for u in blocks if rng.random() < 0.5]


def check_net(seed: int, workdir: Path, moves: str = "depth", families: tuple[str, ...] = ()) -> dict:
    """The three checks on one random net (`families`: extra block families inserted); a dict with what
    was found (mismatch: the failing check)."""
    net = random_net(seed, extra=families)
    x = torch.randn(2, *net.input_shape, generator=torch.Generator().manual_seed(seed))
    units = find_units(net.model, x)
    rng = random.Random(seed + 1)
    widths = []
    if moves == "depth":
        removed = [u for u in units if rng.random() < 0.5] or units[:1]
    else:
        widths, removed = _width_moves(net, units, rng)
    row = {"seed": seed, "input": list(net.input_shape), "units": len(units), "removed": len(removed),
           "slimmed": len(widths), "filled": sum(bool(u.slim.fill) for u in widths),
           "heads_slimmed": sum(head_count(net.model.get_submodule(u.path).get_submodule(root)) is not None
                                for u in widths for root in u.slim.roots),
           "kinds": dict(Counter(u.kind for u in units)), "mismatch": None}
    pruned = remove_units(net.model, widths + removed, x)
    with torch.no_grad():
        expected = muted_reference(net.model, [u.name for u in removed])
        if widths:
            from tests.width_reference import width_muted

            expected = width_muted(expected, widths)
        expected = expected(x)
        got = pruned(x)
    row["surgery_rel_error"] = float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if row["surgery_rel_error"] > SURGERY_RTOL:
        row["mismatch"] = "surgery"
        return row
    folded = fold_batchnorm(pruned, x)[0]
    row["fold_rel_error"] = check_equivalent(pruned, folded, x, FOLD_RTOL, "folding")
    exporter = get_exporter("onnx")
    path = exporter.export(folded, x[:1], workdir / f"net{seed}.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    row["onnx_max_abs_error"] = exporter.check_close(onnx_out, expected.numpy(), str(path))
    path.unlink()
    return row


def render(result: dict) -> str:
    rows, bad = result["nets"], [r for r in result["nets"] if r["mismatch"]]
    kinds = Counter()
    for r in rows:
        kinds.update(r["kinds"])
    worst = {k: max((r.get(k) or 0.0) for r in rows) for k in ("surgery_rel_error", "fold_rel_error",
                                                                "onnx_max_abs_error")}
    lines = [
        f"**{len(bad)} mismatches in {len(rows)} random architectures** "
        f"({sum(r['units'] for r in rows)} units found: {kinds['identity']} identity, {kinds['projection']} "
        f"projection, {kinds['branch']} branch, {kinds['block']} block; {sum(r['removed'] for r in rows)} removed, "
        f"{sum(r.get('slimmed', 0) for r in rows)} slimmed ({sum(r.get('filled', 0) for r in rows)} with means, "
        f"{sum(r.get('heads_slimmed', 0) for r in rows)} attentions by whole heads); "
        f"moves {result.get('moves', 'depth')}; extra block "
        f"families: {', '.join(result.get('families') or ['none'])}).", "",
        "| check | tolerance | worst seen |", "|---|---|---:|",
        f"| surgery vs the muted reference | {SURGERY_RTOL:g} of the output range | "
        f"{worst['surgery_rel_error']:.2e} |",
        f"| BatchNorm folding | {FOLD_RTOL:g} of the output range | {worst['fold_rel_error']:.2e} |",
        f"| ONNX Runtime vs the muted reference | atol 1e-4 + rtol 1e-3 | {worst['onnx_max_abs_error']:.2e} (abs) |",
        "", f"Seeds {rows[0]['seed']}..{rows[-1]['seed']}; {result['seconds']:.0f} s.",
    ]
    lines += [f"- seed {r['seed']}: {r['mismatch']}: {r.get('error', '')}" for r in bad]
    if result.get("parts"):
        lines += ["", f"Merged from {len(result['parts'])} runs side by side (the seconds are theirs added up):",
                  *(f"- `{part['command']}`" for part in result["parts"])]
    return common.document("Random residual architectures: surgery, folding and export", result, lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--nets", type=int, default=1000, help="random architectures (default: %(default)s)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--moves", choices=("depth", "depth+width"), default="depth",
                        help="remove blocks only, or also slim others' inner channels (default: %(default)s)")
    parser.add_argument("--families", type=common.comma_list, default=[],
                        help=f"extra block families inserted between the conv blocks, of {', '.join(EXTRA_FAMILIES)} "
                             "(default: none)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="merge results over disjoint seed ranges (runs side by side) into one table, and exit")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out, parser)
    unknown = set(args.families) - set(EXTRA_FAMILIES)
    if unknown:
        parser.error(f"--families: unknown {', '.join(sorted(unknown))}; known: {', '.join(EXTRA_FAMILIES)}")
    t0 = time.perf_counter()
    result = {**common.provenance("random_architectures"), "moves": args.moves, "families": args.families,
              "nets": []}
    with tempfile.TemporaryDirectory(prefix="random-nets-") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.nets):
            try:
                row = check_net(seed, Path(tmp), args.moves, tuple(args.families))
            except Exception as e:  # a step that raises is a mismatch too, recorded with its reason
                row = {"seed": seed, "units": 0, "removed": 0, "kinds": {}, "mismatch": "raised",
                       "error": f"{type(e).__name__}: {str(e)[:200]}", "trace": traceback.format_exc()[-800:]}
            result["nets"].append(row)
            if row["mismatch"]:
                common.log(f"seed {seed}: MISMATCH ({row['mismatch']}) {row.get('error', '')}")
            if (seed + 1) % 100 == 0:
                common.log(f"{seed + 1 - args.first_seed} nets, "
                           f"{sum(bool(r['mismatch']) for r in result['nets'])} mismatches")
    result["seconds"] = time.perf_counter() - t0
    result["mismatches"] = sum(bool(r["mismatch"]) for r in result["nets"])
    markdown = render(result)
    name = _name(args.moves, args.families)
    common.write_results(args.out, name, result, markdown)
    return common.finish(args.out, name, markdown, t0)


def _name(moves: str, families: list[str]) -> str:
    return "random_architectures" + ("" if moves == "depth" else "_width") + "".join(f"_{f}" for f in families)


def merge(paths: list[Path], out: Path, parser) -> int:
    """One result from several runs' JSON over disjoint seeds with the same moves and families; their
    seconds add up (CPU time of the parts, not the wall time of running them side by side)."""
    t0 = time.perf_counter()
    parts = [json.loads(p.read_text()) for p in paths]
    kinds = {(r.get("moves", "depth"), tuple(r.get("families") or [])) for r in parts}
    if len(kinds) != 1:
        parser.error(f"--merge: the runs differ in moves or families: {sorted(kinds)}")
    nets = sorted((n for r in parts for n in r["nets"]), key=lambda n: n["seed"])
    seeds = [n["seed"] for n in nets]
    if len(set(seeds)) != len(seeds):
        parser.error("--merge: the runs overlap in seeds")
    moves, families = kinds.pop()
    result = {**common.provenance("random_architectures"), "moves": moves, "families": list(families),
              "parts": [{"command": r["command"], "git_commit": r["git_commit"], "date": r["date"]} for r in parts],
              "nets": nets, "seconds": sum(r["seconds"] for r in parts),
              "mismatches": sum(bool(n["mismatch"]) for n in nets)}
    markdown = render(result)
    name = _name(moves, list(families))
    common.write_results(out, name, result, markdown)
    return common.finish(out, name, markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
