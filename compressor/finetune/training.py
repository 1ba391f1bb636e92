"""Training loops: supervised training of zoo models and distillation fine-tuning.

Unlabelled items carry label -1 (compressor.data.UNLABELLED): a batch of them is
fine-tuned by pure distillation from the teacher, and never counted in accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from compressor.compute.amp import autocast, grad_scaler
from compressor.compute.context import Compute
from compressor.compute.loaders import set_epoch, to_device
from compressor.compute.syncbn import restore_batchnorm, synchronise_batchnorm
from compressor.errors import InputError
from compressor.finetune.mimic import MimicPlan, Taps, freeze, mimic_loss
from compressor.metrics.outputs import as_items, first_logits, named_outputs, output_spec

LOSS_EVERY = 10  # steps between loss readings on the progress bar (each reading waits for the device)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent over the labelled items; InputError if every item is unlabelled."""
    model.eval()
    correct = total = unlabelled = 0
    for x, y in loader:
        labelled = y >= 0
        unlabelled += int((~labelled).sum())
        if labelled.all():
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
        elif labelled.any():
            correct += (model(x[labelled]).argmax(1) == y[labelled]).sum().item()
            total += int(labelled.sum())
    if total == 0 and unlabelled:
        msg = "no labelled images to compute accuracy on"
        raise InputError(msg)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def teacher_labelled(loader: DataLoader, teacher: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches with every unlabelled item (-1) labelled by the teacher's top-1,
    for criteria that need labels (sr_init, taylor) on an unlabelled source."""
    teacher.eval()
    batches = []
    for x, y in loader:
        missing = y < 0
        if missing.any():
            y = torch.where(missing, first_logits(teacher(x), why="a criterion that reads labels").argmax(1), y)
        batches.append((x, y))
    return batches


def distillation_loss(student: object, teacher: object, labels: torch.Tensor | None, temperature: float,
                      alpha: float, logits: Sequence[str] | None = None) -> torch.Tensor:
    """Distillation of a model output `teacher` into `student` (a tensor, or a tuple or dict of them:
    metrics/outputs.py names them; `logits` names the class-logit outputs, None: the 2-D ones).

    A lone 2-D output: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels) (Hinton et al.
    2015). Several outputs: the mean over outputs of T^2 * KL per item for logits (a map's cells are items)
    and the normalised squared error (mean squared difference / the teacher's variance) for the others, a
    detector's boxes say; with labels, CE on the first logits output is mixed in as above when it is 2-D
    (labels name one class per image)."""
    if isinstance(student, torch.Tensor) and student.dim() == 2 and logits in (None, ["logits"], ("logits",)):
        kd = _kd(student, teacher, temperature)
        if labels is None or alpha >= 1.0:
            return kd
        return alpha * kd + (1 - alpha) * F.cross_entropy(student, labels)
    ours, theirs = named_outputs(student), named_outputs(teacher)
    spec = output_spec(teacher, logits)
    terms = []
    for name in spec.names:
        s, t = ours[name].float(), theirs[name].float()
        if spec.is_logits(name):
            terms.append(_kd(as_items(s), as_items(t), temperature))
        else:
            terms.append(((s - t) ** 2).mean() / t.detach().var().clamp_min(1e-12))
    loss = torch.stack(terms).mean()
    first = spec.first_logits
    if labels is None or alpha >= 1.0 or first is None or ours[first].dim() != 2:
        return loss
    return alpha * loss + (1 - alpha) * F.cross_entropy(ours[first].float(), labels)


def _kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher_T || student_T), per item (rows: items, columns: classes)."""
    return F.kl_div(F.log_softmax(student.float() / temperature, 1), F.log_softmax(teacher.float() / temperature, 1),
                    reduction="batchmean", log_target=True) * temperature**2


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float,
          teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7,
          weight_decay: float = 5e-4, desc: str = "train", freeze_batchnorm: bool = False,
          mimic: MimicPlan | None = None, mimic_weight: float = 1.0,
          on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None,
          compute: Compute | None = None, logits: Sequence[str] | None = None) -> nn.Module:
    """SGD (momentum 0.9, Nesterov), linear warm-up then a per-step cosine schedule.

    With a `teacher`, the loss is distillation from its outputs (distillation_loss; `logits` names
    the class-logit outputs of a model with several) mixed with the
    labels (pure distillation for a batch with unlabelled items); without one,
    plain cross-entropy, which needs labels (InputError otherwise). With
    `freeze_batchnorm`, BatchNorm layers normalise with their running statistics
    and keep them (their affine parameters still learn): for fine-tuning on
    few images, whose statistics would overwrite the pretrained ones. With a
    `mimic` plan (and a teacher), `mimic_weight` x the feature-mimicking loss
    (compressor.finetune.mimic) is added and the plan's prefix parameters stay frozen.

    `compute` (compressor.compute; default: the CPU, fp32, one process) says where it runs: the model and
    the teacher must already be on its device; batches are moved there as they are drawn, forward passes
    run under its mixed precision (fp16 with a gradient scaler), and in a process group the model is
    wrapped in DistributedDataParallel with BatchNorm over the global batch (compute/syncbn.py), `loader`
    being this rank's share (compute/loaders.training_loader). Images per second go to the progress bar
    (rank 0's) and to `compute.rates["finetune"]`.

    `on_epoch(state)` gets, after every epoch, {"epoch": epochs done, "model", "optimiser", "schedule",
    "scaler": state_dicts, "sampler": the order's seed and epoch, "world_size", "images_per_s", "loss"};
    `resume` is such a state, from which training continues (the model's weights, the optimiser's momentum,
    the schedule's step and the scaler are restored, and the finished epochs are skipped; the loader's
    sampler, seeded per epoch, gives the next epoch the order it would have had).
    """
    if epochs <= 0:
        return model
    if mimic is not None and teacher is None:
        msg = "feature mimicking needs a teacher"
        raise InputError(msg)
    compute = compute or Compute.local()
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    if mimic is not None:
        freeze(model, mimic.frozen)
    world = compute.world
    synced = synchronise_batchnorm(model, world.group, compute.device) if world.parallel else []
    try:
        _train(_Loop(model, loader, epochs, teacher, temperature, alpha, freeze_batchnorm, mimic, mimic_weight,
                     compute, desc, logits), lr, weight_decay, on_epoch, resume)
    finally:
        restore_batchnorm(model, synced)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
    model.eval()
    return model


@dataclass
class _Loop:
    """What one training run works with."""

    model: nn.Module
    loader: DataLoader
    epochs: int
    teacher: nn.Module | None
    temperature: float
    alpha: float
    freeze_batchnorm: bool
    mimic: MimicPlan | None
    mimic_weight: float
    compute: Compute
    desc: str
    logits: Sequence[str] | None = None


def _wrapped(model: nn.Module, compute: Compute) -> nn.Module:
    """`model` itself alone; in a process group, DistributedDataParallel over it (gradients averaged over
    the ranks; static_graph: the same parameters take part in every step, and any left unused by a
    user's model are allowed)."""
    if not compute.world.parallel:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = compute.device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   process_group=compute.world.group, static_graph=True)


def _train(run: _Loop, lr: float, weight_decay: float, on_epoch: Callable[[dict], None] | None,
           resume: dict | None) -> None:
    model, loader, epochs, compute = run.model, run.loader, run.epochs, run.compute
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    steps = epochs * len(loader)
    warmup = max(1, min(len(loader), steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    scaler = grad_scaler(compute.amp, compute.device)
    done = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimiser.load_state_dict(resume["optimiser"])
        schedule.load_state_dict(resume["schedule"])
        scaler.load_state_dict(resume.get("scaler") or {})
        done = int(resume["epoch"])
    if run.teacher is not None:
        run.teacher.eval()
    net = _wrapped(model, compute)  # after the resumed weights: DDP starts every rank from rank 0's
    world = compute.world
    per_step = getattr(loader, "batch_size", None) or 1
    images = steps * per_step * world.size
    student_taps = Taps(model, run.mimic) if run.mimic is not None else None
    teacher_taps = Taps(run.teacher, run.mimic) if run.mimic is not None else None
    bar = tqdm(total=images, initial=done * len(loader) * per_step * world.size, desc=run.desc, unit="img",
               unit_scale=True, disable=None if world.is_main else True, leave=False)
    with student_taps or nullcontext(), teacher_taps or nullcontext(), bar:
        for epoch in range(done, epochs):
            set_epoch(loader, epoch)
            started = time.perf_counter()
            seen, loss_sum = _epoch(run, net, (student_taps, teacher_taps), optimiser, schedule, scaler, bar)
            compute.synchronize()
            seconds = time.perf_counter() - started
            compute.record("finetune", seen, seconds)
            if on_epoch is not None:
                on_epoch({"epoch": epoch + 1, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                          "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                          "sampler": {"seed": getattr(getattr(loader, "sampler", None), "seed", None),
                                      "epoch": epoch + 1},
                          "world_size": world.size, "images_per_s": seen / seconds if seconds > 0 else 0.0,
                          "loss": loss_sum})


def _epoch(run: _Loop, net: nn.Module, taps: tuple, optimiser: torch.optim.Optimizer,
           schedule: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler,
           bar: tqdm) -> tuple[int, float]:
    """One pass over the loader; (images seen by all ranks, mean loss of this rank's steps)."""
    model, compute, teacher = run.model, run.compute, run.teacher
    memory_format = compute.memory_format(model)
    student_taps, teacher_taps = taps
    net.train()
    frozen = set(run.mimic.frozen) if run.mimic is not None else set()
    for name, m in model.named_modules():
        # frozen statistics: all of them, or those of the frozen prefix (it must stay the teacher's)
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (run.freeze_batchnorm or f"{name}.weight" in frozen):
            m.eval()
    seen, steps = 0, 0
    total = torch.zeros((), device=compute.device)
    for x, y in run.loader:
        labelled = bool((y >= 0).all())  # on the host, before the copy: no device sync per step
        if teacher is None and not labelled:
            msg = "cannot train on unlabelled images without a teacher to distil from"
            raise InputError(msg)
        x, y = to_device(x, compute.device, memory_format), to_device(y, compute.device)
        labels = y if labelled else None
        with autocast(compute.amp, compute.device):
            output = net(x)
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(x)
        if teacher is None:
            loss = F.cross_entropy(first_logits(output, run.logits, "training without a teacher").float(), labels)
        else:
            loss = distillation_loss(output, target, labels, run.temperature, run.alpha, run.logits)
            if student_taps is not None:
                loss = loss + run.mimic_weight * mimic_loss(_float(student_taps.values), _float(teacher_taps.values))
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
        schedule.step()
        total += loss.detach()
        steps += 1
        images = len(x) * compute.world.size
        seen += images
        bar.update(images)
        if steps % LOSS_EVERY == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return seen, float(total) / max(steps, 1)


def _float(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in values.items()}
