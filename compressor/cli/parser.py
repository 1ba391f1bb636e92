"""The argument parser: one function per command, arguments that mean the same thing defined once."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from compressor.errors import InputError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are InputErrors (one line, exit 2), not usage text on stderr."""

    def error(self, message: str):
        raise InputError(message)


def _number(text: str, convert: Callable[[str], float], ok: Callable[[float], bool], what: str) -> float:
    """`text` as a number that `ok` accepts, else argparse's one-line refusal saying it `what`."""
    try:
        value = convert(text)
    except ValueError:
        value = float("nan")
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return int(_number(text, int, lambda v: v > 0, "must be a positive integer"))


def non_negative_int(text: str) -> int:
    return int(_number(text, int, lambda v: v >= 0, "must be zero or a positive integer"))


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < float("inf"), "must be a positive number")


def input_shape(text: str) -> tuple[int, int, int]:
    """C,H,W (commas or x), e.g. 3,224,224."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(f"must be C,H,W of three positive integers (e.g. 3,224,224), got {text!r}")
    return shape


MODEL_HELP = ("zoo name (resnet56, efficientnet_lite0, vit_digits, det_digits, ...), a checkpoint file, "
              "MODULE:FACTORY (your own code: a function or class returning the nn.Module), or timm:NAME")
DATA_HELP = "digits32 | digit_canvas | photos | cifar10:DIR | imagefolder:DIR | npz:FILE"


def model_arguments(p: argparse.ArgumentParser, data_required: bool = False, data_help: str = DATA_HELP) -> None:
    """--model, --weights, --input-shape, --data: what names the model and what it runs on."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--weights", help="state_dict file for --model MODULE:FACTORY, timm:NAME or a zoo name "
                                     "(loaded with weights_only=True and strict=True)")
    p.add_argument("--input-shape", type=input_shape, metavar="C,H,W",
                   help="input shape when the data does not fix it (e.g. 3,224,224)")
    p.add_argument("--data", required=data_required, help=data_help)


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _prune(sub) -> None:
    p = sub.add_parser("prune", help="remove residual units until a measured latency target is met")
    model_arguments(p, data_required=True)
    p.add_argument("--profile", required=True, help="built-in profile name (ort-cpu) or YAML path")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-ms", type=float, help="median latency to reach (ms)")
    target.add_argument("--target-speedup", type=float, help="speedup over the unpruned model (x)")
    p.add_argument("--criterion", default="cka",
                   help="unit importance: cka, sr_init, entropy, taylor, magnitude, magnitude_l2, random "
                        "(default: cka)")
    p.add_argument("--out", required=True, help="new output folder (refused if not empty)")
    p.add_argument("--finetune-epochs", type=non_negative_int, default=4, help="distillation epochs (default: 4)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning learning rate (default: 0.02; 0.002 with BatchNorm statistics frozen "
                        "for pretrained models such as efficientnet_lite0)")
    p.add_argument("--mimic", action=argparse.BooleanOptionalAction, default=None,
                   help="also match every kept block's output and the penultimate features while fine-tuning, "
                        "with the unchanged prefix frozen (default: on for pretrained models)")
    p.add_argument("--selection", choices=("knapsack", "greedy"), default=None,
                   help="how removal sets are proposed: knapsack over the criterion's single-unit scores, or "
                        "greedy removal by the whole set's measured KL on 128 calibration images "
                        "(default: greedy for pretrained models, knapsack otherwise)")
    p.add_argument("--calibration-size", type=positive_int, default=512, help="images for scoring")
    p.add_argument("--max-trials", type=positive_int, default=8,
                   help="candidates the search measures on the runtime, at most (default: 8)")
    p.add_argument("--min-blocks-per-stage", type=non_negative_int, default=1,
                   help="blocks each stage keeps, counting a stage's blocks that are not units (default: 1)")
    p.add_argument("--merge", action="store_true",
                   help="also offer 'linearise and merge into one conv' for each block (criterion cka or random)")
    p.add_argument("--latency-table", help="reuse a table from `compressor profile` instead of measuring")
    p.add_argument("--precision", choices=("fp32", "int8", "auto"), default="fp32",
                   help="int8: quantize with the runtime's own quantizer; auto: measure both and keep the (set, "
                        "precision) that meets the target losing least fidelity (default: fp32)")
    p.add_argument("--int8-calibration-size", type=positive_int, default=None,
                   help="images each INT8 candidate and the delivered INT8 model are calibrated on (default: the "
                        "quantizer's, 300, NNCF's own default; fewer quantize faster)")
    p.add_argument("--logits", default=None,
                   help="comma-separated names of the model's outputs that are class logits (a lone output is "
                        "'logits', a tuple's 'output0', 'output1' ..., a dict's by key; default: the 2-D ones); "
                        "logits are compared by KL and top-1 agreement, other outputs by cosine and normalised MSE")
    p.add_argument("--moves", choices=("depth", "width", "depth+width"), default="depth",
                   help="what the search may do to a block: remove it or a branch (depth), slim its inner channels "
                        "to 75/50/25%% at channel counts timed on the runtime (width), or either (default: depth)")
    p.add_argument("--channel-criterion", choices=("peel", "magnitude", "magnitude_l2", "taylor", "random"),
                   default=None, help="which inner channels a slimmed block keeps (default: the --criterion's own "
                                      "for magnitude, taylor and random, else peel: BatchNorm scale)")
    p.add_argument("--train-device", default="auto", metavar="auto|cpu|cuda|cuda:N|mps",
                   help="where scoring, fine-tuning and fidelity run (default: auto, CUDA when available); "
                        "under torchrun each process takes its local rank's GPU (docs/scale.md)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision for fine-tuning on CUDA: auto = bf16 where the GPU has it, else fp16 "
                        "with a gradient scaler; off = fp32 (default: auto; CPU and MPS fine-tune in fp32)")
    p.add_argument("--finetune-batch", type=positive_int, default=32,
                   help="images per fine-tuning step, all processes together (each of N takes 1/N; default: 32)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="DataLoader processes per process (default: none for data held in memory as tensors, "
                        "else the CPUs less one, shared among the processes of a machine)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out (refused if the model, data, profile, target, "
                        "options, machine or number of processes differ)")
    p.add_argument("--repeats", type=positive_int, default=3, help="seeds averaged by sr_init (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    common_arguments(p)


def _profile(sub) -> None:
    p = sub.add_parser("profile", help="measure the latency model: each structure group's saving, with its "
                                       "uncertainty, fitted on designed removal sets (latency table JSON)")
    model_arguments(p, data_help="data source the zoo model is trained on (sets the input shape)")
    p.add_argument("--profile", required=True)
    p.add_argument("--uncertainty", type=positive_float, default=0.02,
                   help="measure more sets until random removal sets are predicted within this relative standard "
                        "error (root mean square; default %(default)s)")
    p.add_argument("--max-sets", type=positive_int, help="at most this many removal sets (default: twice the "
                                                         "initial design)")
    p.add_argument("--min-blocks-per-stage", type=non_negative_int, default=1,
                   help="the sets keep this many blocks per stage, as `prune` does (default %(default)s)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="JSON file to write (refused if it exists)")
    where.add_argument("--bundle", help="instead of timing here, write the candidates, the runner and a manifest "
                                        "to this new folder, for `python3 DIR/measure.py --out results.json` on the "
                                        "device")
    p.add_argument("--json", action="store_true")
    common_arguments(p)


def _units(sub) -> None:
    p = sub.add_parser("units", help="list the removable units found by tracing")
    model_arguments(p)
    p.add_argument("--json", action="store_true")
    common_arguments(p)


def _score(sub) -> None:
    p = sub.add_parser("score", help="score every unit under several criteria and compare their rankings")
    model_arguments(p, data_required=True)
    p.add_argument("--criterion", required=True, help="comma-separated criteria, e.g. cka,magnitude,random")
    p.add_argument("--profile", help="also measure each unit's latency saving (ms) on this profile")
    p.add_argument("--k", type=positive_int, help="size of the least-important sets compared (default: units / 3)")
    p.add_argument("--calibration-size", type=positive_int, default=512, help="images for scoring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=positive_int, default=3, help="seeds averaged by sr_init (default: 3)")
    p.add_argument("--train-device", default="auto", metavar="auto|cpu|cuda|cuda:N|mps",
                   help="where the criteria run (default: auto, CUDA when available)")
    p.add_argument("--heatmap", help="PNG of the agreement matrices (refused if it exists)")
    p.add_argument("--json", action="store_true", help="print the result as JSON to stdout")
    p.add_argument("--out", help="JSON file to write (refused if it exists)")
    common_arguments(p)


def _train(sub) -> None:
    p = sub.add_parser("train", help="train a zoo model on a data source (our own training code)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=positive_int, help="default: the model's recipe (20 for ResNets, SGD)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the model's recipe; 0.1 for ResNets)")
    p.add_argument("--batch-size", type=positive_int, help="default: the model's recipe (32 for ResNets)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-device", default="auto", metavar="auto|cpu|cuda|cuda:N|mps",
                   help="where it trains (default: auto, CUDA when available)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto",
                   help="mixed precision on CUDA (default: auto, as for prune)")
    p.add_argument("--out", required=True)
    common_arguments(p)


def _export(sub) -> None:
    p = sub.add_parser("export", help="export a model to ONNX, OpenVINO IR, TensorRT (or a device bundle), torch")
    model_arguments(p, data_help="data source a zoo model is trained on (sets weights and input shape)")
    p.add_argument("--format", required=True, help="comma-separated: onnx,openvino,tensorrt,torch")
    p.add_argument("--out", required=True, help="output folder (created; existing artifacts are refused)")
    p.add_argument("--name", default="model", help="artifact file stem (default: model)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="openvino: fp16 = FP16-compressed weights; tensorrt: fp16/int8 builder flags; int8 for "
                        "onnx/openvino: each runtime's own quantizer, calibrated on --data, refused below the "
                        "fidelity floor (docs/quantization.md)")
    p.add_argument("--calibration-size", type=positive_int, default=300,
                   help="int8: calibration images from --data's training split (default: 300)")
    p.add_argument("--calibrate", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="int8, onnx: ONNX Runtime's calibration method (default: minmax)")
    p.add_argument("--min-agreement", type=float, default=None,
                   help="int8: least top-1 agreement with fp32 on --data's held-out split, %% (default: 70)")
    p.add_argument("--min-sqnr", type=float, default=None,
                   help="int8: least SQNR of the logits against fp32, dB (default: 10)")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size of the exported input (default: 1)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX/TensorRT: symbolic batch axis")
    p.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxslim")
    p.add_argument("--workspace-mb", type=positive_int, default=1024, help="TensorRT builder workspace (MiB)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    common_arguments(p)


def _fold(sub) -> None:
    p = sub.add_parser("fold", help="fold BatchNorm (and merge convs where exact) and export ONNX without BatchNorm")
    model_arguments(p, data_help="data source a zoo model is trained on (sets weights and input shape)")
    p.add_argument("--out", required=True, help="new output folder (refused if not empty)")
    p.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON to stdout")
    common_arguments(p)


def _bench(sub) -> None:
    p = sub.add_parser("bench", help="time an exported artifact and gate it against a baseline (asv's rule)")
    p.add_argument("--artifact", required=True, help="exported artifact: .onnx (onnxruntime) or .xml (openvino)")
    p.add_argument("--profile", required=True, help="built-in profile name (ort-cpu) or YAML path")
    p.add_argument("--baseline", help="baseline JSON from --save-baseline to compare with")
    p.add_argument("--against", help="another artifact timed interleaved with --artifact, as the reference")
    p.add_argument("--threshold", type=float, default=1.10,
                   help="regression if median ratio exceeds this AND Mann-Whitney p < 0.002 (default: 1.10)")
    p.add_argument("--save-baseline", help="write this measurement as a baseline JSON (refused if it exists)")
    p.add_argument("--allow-foreign-baseline", action="store_true",
                   help="compare with a baseline from another profile or machine (flagged in the report)")
    p.add_argument("--runs", type=positive_int, help="minimum timed runs (default: the profile's report floor)")
    p.add_argument("--min-time", type=float, help="minimum timed seconds (default: the profile's report floor)")
    p.add_argument("--json", action="store_true", help="print the report as JSON to stdout")
    p.add_argument("--out", help="report JSON file to write (refused if it exists)")
    p.add_argument("--bundle", help="instead of timing here, write the artifact (and --against), the runner and a "
                                    "manifest to this new folder, for `python3 DIR/measure.py` on the device")
    p.add_argument("--results", help="judge the figures a bundle's measure.py wrote on the device (results JSON)")
    common_arguments(p)


COMMANDS = {"prune": _prune, "profile": _profile, "units": _units, "score": _score, "train": _train,
            "export": _export, "fold": _fold, "bench": _bench}


def build_parser(description: str = "prune PyTorch models under a measured latency target") -> argparse.ArgumentParser:
    from compressor.cli import commands

    parser = OneLineParser(prog="compressor", description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add in COMMANDS.items():
        add(sub)
        sub.choices[name].set_defaults(run=getattr(commands, f"cmd_{name}"))
    return parser
