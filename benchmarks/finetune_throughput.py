"""Fine-tuning throughput (images/s) by where it runs: 1 and 2 CPU processes (torchrun, gloo), and on a
machine with a GPU 1 GPU with mixed precision on and off.

For each model/data pair (default resnet56/digits32 and efficientnet_lite0/photos) the student is the
model with every other unit of its most-removable set removed, fine-tuned by distillation from the
unpruned model exactly as `compressor prune` fine-tunes it (compressor.stages.recover.finetune: the
model's learning rate, BatchNorm setting and feature mimicking; global batch --batch, all processes
together). Each configuration runs in its own process(es), started by this script (torchrun for several
processes); CPU processes get the physical cores shared out (OMP_NUM_THREADS). The figure is the last
epoch's images/s (the first pays for start-up: worker processes, cuDNN's autotuning, DDP's first
buckets); every epoch's is kept in the JSON.

    .venv/bin/python benchmarks/finetune_throughput.py --out benchmarks/results
    .venv/bin/python benchmarks/finetune_throughput.py --pairs resnet56/digits32 --images 256 --epochs 2 \\
        --out /tmp/tp   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from common import log

NAME = "finetune_throughput"
PAIRS = "resnet56/digits32,efficientnet_lite0/photos"
# configuration -> (processes, train device, amp)
CONFIGS = {"cpu-1": (1, "cpu", "off"), "cpu-2": (2, "cpu", "off"),
           "cuda-1-amp": (1, "cuda", "auto"), "cuda-1-fp32": (1, "cuda", "off")}


def _student(model: str, data_spec: str, images: int | None):
    """(loaded model, data, student): the data cut to `images` training images where given."""
    from torch.utils.data import Subset

    from compressor.data import load_data
    from compressor.graph.surgery import remove_units
    from compressor.graph.units import find_units
    from compressor.models.sources import load_model
    from compressor.search.knapsack import most_removable

    data = load_data(data_spec)
    loaded = load_model(model, data)
    if images is not None and images < len(data.train):
        data.train = Subset(data.train, list(range(images)))
    x = loaded.example_input()
    removed = most_removable(find_units(loaded.model.eval(), x), 1)[::2]
    return loaded, data, remove_units(loaded.model, removed, x), removed


def worker(spec: dict) -> None:
    """One configuration, in this process (one rank of it under torchrun): fine-tune and, on rank 0,
    write the figures to spec["result"]."""
    from compressor.compute.context import in_group, open_compute
    from compressor.compute.device import describe_device
    from compressor.finetune.mimic import plan_mimic
    from compressor.stages.options import PruneOptions
    from compressor.stages.recover import finetune, finetune_settings

    torch.manual_seed(0)
    loaded, data, student, removed = _student(spec["model"], spec["data"], spec["images"])
    options = PruneOptions(finetune_batch=spec["batch"], train_device=spec["device"], amp=spec["amp"],
                           loader_workers=spec["workers"])
    settings = finetune_settings(options, loaded)
    mimic = plan_mimic(student, removed, loaded.example_input()) if settings.mimic else None
    epochs: list[dict] = []
    with in_group(open_compute(spec["device"], spec["amp"], spec["workers"])) as compute:
        with compute.placed(loaded.model):
            finetune(student, loaded.model, data, settings, mimic, spec["epochs"], options, compute,
                     on_epoch=lambda e: epochs.append({"epoch": e["epoch"], "images_per_s": e["images_per_s"],
                                                       "loss": e["loss"]}))
        if compute.world.is_main:
            Path(spec["result"]).write_text(json.dumps({
                "device": describe_device(compute.device), "precision": compute.amp.name,
                "processes": compute.world.size, "threads_per_process": torch.get_num_threads(),
                "loader_workers": compute.workers_used.get("finetune"), "removed_units": len(removed),
                "train_images": len(data.train), "epochs": epochs,
                "images_per_s": epochs[-1]["images_per_s"] if epochs else None}))


def _run(config: str, pair: str, args, folder: Path) -> dict:
    processes, device, amp = CONFIGS[config]
    model, data = pair.split("/")
    result = folder / f"{config}-{model}.json"
    spec = {"model": model, "data": data, "device": device, "amp": amp, "batch": args.batch, "epochs": args.epochs,
            "images": args.images, "workers": args.workers, "result": str(result)}
    spec_path = folder / f"{config}-{model}-spec.json"
    spec_path.write_text(json.dumps(spec))
    script = str(Path(__file__).resolve())
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1
                else [sys.executable])
    env = dict(os.environ)
    if device == "cpu":
        from compressor.latency.machine import physical_cores

        env["OMP_NUM_THREADS"] = str(max(1, physical_cores() // processes))
    log(f"{config}: {pair} ({processes} process(es), {device}, amp {amp})")
    started = time.perf_counter()
    done = subprocess.run([*launcher, script, "--worker", str(spec_path)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"config": config, "pair": pair, "error": lines[-1] if lines else f"exit {done.returncode}"}
    figures = json.loads(result.read_text())
    log(f"  {figures['images_per_s']:,.0f} images/s (last epoch; {time.perf_counter() - started:.0f} s in all)")
    return {"config": config, "pair": pair, **figures}


def _markdown(result: dict) -> str:
    rows = ["| model / data | configuration | device | precision | processes x threads | loader workers | "
            "images/s (last epoch) |", "|---|---|---|---|---|---|---:|"]
    for r in result["runs"]:
        if "error" in r:
            rows.append(common.failed_row([r["pair"], r["config"]], r["error"], 7))
            continue
        rows.append(f"| {r['pair']} | {r['config']} | {r['device']} | {r['precision']} | "
                    f"{r['processes']} x {r['threads_per_process']} | {r['loader_workers']} | "
                    f"{r['images_per_s']:,.0f} |")
    setting = result["setting"]
    gpu = f"; GPU: {result['gpu']}" if result["gpu"] else "; no GPU"
    lines = [f"Distillation fine-tuning as `compressor prune` runs it (global batch {setting['batch']}, "
             f"{setting['epochs']} epochs, {setting['images'] or 'all'} training images; the student has every other "
             "unit of its most-removable set removed). Images/s of the last epoch, all processes together.", "",
             *rows]
    return common.document("Fine-tuning throughput", result, lines, machine_extra=gpu, source=True)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--pairs", default=PAIRS, help="comma-separated MODEL/DATA (default: %(default)s)")
    parser.add_argument("--configs", default=None,
                        help=f"comma-separated, of {', '.join(CONFIGS)} (default: the CPU ones, and the CUDA ones "
                             "where CUDA is available)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per run; the last is reported (default: 2)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (default: 32, as prune)")
    parser.add_argument("--images", type=int, default=None, help="training images, at most (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers per process (default: auto)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration's spec: run it here
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return 0
    cuda = torch.cuda.is_available()
    default = [c for c in CONFIGS if cuda or not c.startswith("cuda")]
    configs = common.known_list(parser, "--configs", args.configs, CONFIGS) if args.configs else default
    t0 = time.perf_counter()
    result = {**common.provenance(NAME), "gpu": torch.cuda.get_device_name(0) if cuda else None,
              "setting": {"batch": args.batch, "epochs": args.epochs, "images": args.images, "workers": args.workers},
              "runs": []}
    with tempfile.TemporaryDirectory(prefix="finetune-throughput-") as tmp:
        for pair in common.comma_list(args.pairs):
            for config in configs:
                result["runs"].append(_run(config, pair, args, Path(tmp)))
    markdown = _markdown(result)
    common.write_results(args.out, NAME, result, markdown)
    return common.finish(args.out, NAME, markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
