"""Mixed precision for fine-tuning: `--amp auto|off|bf16|fp16`, resolved per device.

On CUDA, `auto` is bf16 autocast where the GPU supports it (Ampere and later) and fp16 with a gradient
scaler otherwise (fp16's narrow exponent underflows small gradients without one). Elsewhere fine-tuning
stays in fp32: CPU autocast is slower than fp32 on most CPUs, so `bf16`/`fp16` there are refused rather
than quietly slow. Scores, greedy KL and fidelity always run in fp32, so what a run chooses does not
depend on the card.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from compressor.errors import InputError

AMP_CHOICES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class Amp:
    """Autocast dtype (None: fp32) and whether the loss is scaled (fp16)."""

    dtype: torch.dtype | None = None
    scaler: bool = False

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


FP32 = Amp()


def cuda_amp(choice: str, bf16_supported: bool) -> Amp:
    """The CUDA rule: auto = bf16 where supported, else fp16 with a scaler; bf16 refused where unsupported."""
    if choice == "off":
        return FP32
    if choice == "fp16" or (choice == "auto" and not bf16_supported):
        return Amp(torch.float16, scaler=True)
    if not bf16_supported:
        msg = "--amp bf16: this GPU has no bf16 support (it needs Ampere or later); use --amp fp16 or auto"
        raise InputError(msg)
    return Amp(torch.bfloat16)


def _fp32_only(kind: str) -> Callable[[str, torch.device], Amp]:
    def rule(choice: str, device: torch.device) -> Amp:
        if choice in ("bf16", "fp16"):
            msg = f"--amp {choice}: mixed precision runs on CUDA; fine-tuning on {kind} stays fp32 (--amp auto or off)"
            raise InputError(msg)
        return FP32

    return rule


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 natively (compute capability 8.0 and later, or ROCm): torch's
    is_bf16_supported also says yes where bf16 is only emulated, which is slower than fp16."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


# device type -> rule(choice, device)
AMP_RULES: dict[str, Callable[[str, torch.device], Amp]] = {
    "cuda": lambda choice, device: cuda_amp(choice, choice != "off" and native_bf16(device)),
    "cpu": _fp32_only("cpu"),
    "mps": _fp32_only("mps"),
}


def check_amp(choice: str) -> None:
    if choice not in AMP_CHOICES:
        msg = f"unknown --amp {choice!r}; known: {', '.join(AMP_CHOICES)}"
        raise InputError(msg)


def resolve_amp(choice: str, device: torch.device) -> Amp:
    """What `choice` means on `device` (InputError where it cannot run there)."""
    check_amp(choice)
    return AMP_RULES.get(device.type, _fp32_only(device.type))(choice, device)


def autocast(amp: Amp, device: torch.device) -> AbstractContextManager:
    """torch.autocast for `amp` on `device`, or nothing for fp32."""
    if amp.dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp.dtype)


def grad_scaler(amp: Amp, device: torch.device) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for fp16 (disabled, it passes the loss and the step through)."""
    return torch.amp.GradScaler(device.type, enabled=amp.scaler)
