"""`det_digits`'s own training: targets per cell, the detection loss, the loop on fresh canvases, its figures.

Each digit is assigned to one head by its size (longer side up to SPLIT pixels: the
stride-8 head, else the stride-16 head) and, there, to the cell holding its centre
(two non-overlapping digits of one size range share a cell only when two of the
narrowest large digits stand edge to edge: none in 4,096 canvases; the later one is
kept). That cell must
predict the digit's class and regress its box: the centre's offset in the cell
(0..1) and log width and height in cells; every other cell predicts "no digit"
(the last class). Loss: cross-entropy over cells, background cells weighted
BACKGROUND_WEIGHT, plus BOX_WEIGHT x smooth L1 on the boxes of digit cells, both per
digit. Trained on canvases drawn afresh every epoch from the training digits
(compressor.data.canvas), so no canvas is seen twice; measured on the held-out canvases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from compressor.data.bundle import DataBundle
from compressor.data.canvas import NO_BOX, VAL_CANVASES, Canvases, digit_splits, draw_canvases, split_canvases
from compressor.errors import InputError
from compressor.models.det_digits import BOX, STRIDES
from compressor.models.recipes import TrainSettings, cosine_schedule, optimiser_step, training_compute

SPLIT = 20  # pixels: digits whose longer side is at most this go to the stride-8 head
BACKGROUND_WEIGHT = 0.25
BOX_WEIGHT = 2.0
EPOCHS = 40
CANVASES = 2048  # drawn afresh for every epoch
LR = 2e-3
BATCH = 64
WEIGHT_DECAY = 5e-4
WARMUP_EPOCHS = 3
IOU_MATCH = 0.5  # a detection counts when its box overlaps a digit of its class this much


@dataclass(frozen=True)
class Targets:
    """Per head: class index per cell (N x H x W; `num_classes` = no digit) and box (N x 4 x H x W)."""

    classes: list[torch.Tensor]
    boxes: list[torch.Tensor]


def encode(boxes: torch.Tensor, size: int, num_classes: int) -> Targets:
    """The per-cell targets of canvases of side `size` whose digits are `boxes` (N x k x 5 rows)."""
    n = boxes.shape[0]
    classes = [torch.full((n, size // s, size // s), num_classes, dtype=torch.long) for s in STRIDES]
    regress = [torch.zeros(n, BOX, size // s, size // s) for s in STRIDES]
    for i, j in (boxes[:, :, 0] != NO_BOX).nonzero().tolist():
        label, x1, y1, x2, y2 = boxes[i, j].tolist()
        w, h = x2 - x1, y2 - y1
        head = 0 if max(w, h) <= SPLIT else 1
        s = STRIDES[head]
        cx, cy = (x1 + x2) / 2 / s, (y1 + y2) / 2 / s
        col, row = min(int(cx), size // s - 1), min(int(cy), size // s - 1)
        classes[head][i, row, col] = int(label)
        regress[head][i, :, row, col] = torch.tensor([cx - col, cy - row, math.log(w / s), math.log(h / s)])
    return Targets(classes, regress)


def split_output(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A head's map as (box N x 4 x H x W, class logits N x (classes + 1) x H x W)."""
    return out[:, :BOX], out[:, BOX:]


def detection_loss(outputs: tuple[torch.Tensor, ...], targets: Targets) -> torch.Tensor:
    """Cross-entropy over cells (background weighted) plus smooth L1 on digit cells' boxes, per digit."""
    cls_loss = box_loss = 0.0
    digits = 0
    for out, classes, boxes in zip(outputs, targets.classes, targets.boxes, strict=True):
        box, logits = split_output(out)
        background = logits.shape[1] - 1
        ce = F.cross_entropy(logits, classes, reduction="none")
        positive = classes != background
        cls_loss = cls_loss + ce[positive].sum() + BACKGROUND_WEIGHT * ce[~positive].sum()
        mask = positive.unsqueeze(1).expand_as(box)
        box_loss = box_loss + F.smooth_l1_loss(box[mask], boxes[mask], beta=0.1, reduction="sum") / BOX
        digits += int(positive.sum())
    return (cls_loss + BOX_WEIGHT * box_loss) / max(digits, 1)


def decode(outputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Per canvas, the detections of every cell whose top class is a digit: rows (class, score, x1, y1, x2, y2)."""
    rows = []
    for head, out in enumerate(outputs):
        box, logits = split_output(out)
        s = STRIDES[head]
        n, _, h, w = box.shape
        rowi, coli = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cx, cy = (coli + box[:, 0]) * s, (rowi + box[:, 1]) * s
        bw, bh = box[:, 2].exp() * s, box[:, 3].exp() * s
        score, label = logits.softmax(1).max(1)
        rows.append(torch.stack([label.float(), score, cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2],
                                -1).reshape(n, -1, 6))
    every = torch.cat(rows, 1)
    return [r[r[:, 0] < outputs[0].shape[1] - BOX - 1] for r in every]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of every box of `a` (M x 4) with every box of `b` (K x 4), (x1, y1, x2, y2)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp_min(1e-9)


@torch.no_grad()
def detection_quality(model: nn.Module, canvases: Canvases, batch_size: int = 128) -> dict[str, float]:
    """On `canvases`: the digit cells' class accuracy (%), the background cells' accuracy (%), the mean IoU
    of the digit cells' boxes with their digits, and detections' precision and recall (%): a detection is
    a cell whose top class is a digit, correct when it overlaps a digit of that class by IOU_MATCH
    (each digit matched once)."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # an oracle may have none
    hits = digit_cells = bg_hits = bg_cells = matched = detections = 0
    ious: list[torch.Tensor] = []
    for start in range(0, len(canvases.images), batch_size):
        images = canvases.normalised()[start:start + batch_size]
        boxes = canvases.boxes[start:start + batch_size]
        outputs = tuple(o.float().cpu() for o in model(images.to(device)))
        background = outputs[0].shape[1] - BOX - 1
        targets = encode(boxes, images.shape[-1], background)
        for out, classes, regress in zip(outputs, targets.classes, targets.boxes, strict=True):
            box, logits = split_output(out)
            positive = classes != background
            predicted = logits.argmax(1)
            hits += int((predicted == classes)[positive].sum())
            digit_cells += int(positive.sum())
            bg_hits += int((predicted == classes)[~positive].sum())
            bg_cells += int((~positive).sum())
            ious.append(_cell_ious(box, regress, positive))
        for found, truth in zip(decode(outputs), boxes, strict=True):
            truth = truth[truth[:, 0] != NO_BOX]
            detections += len(found)
            matched += _matches(found, truth)
    iou = torch.cat(ious)
    return {"cell_accuracy": 100.0 * hits / max(digit_cells, 1),
            "background_accuracy": 100.0 * bg_hits / max(bg_cells, 1),
            "box_iou": float(iou.mean()) if len(iou) else 0.0,
            "precision": 100.0 * matched / max(detections, 1),
            "recall": 100.0 * matched / max(int((canvases.boxes[:, :, 0] != NO_BOX).sum()), 1)}


def _cell_ious(box: torch.Tensor, target: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """IoU of predicted and target boxes at digit cells (both in cell units relative to the cell)."""
    def corners(t: torch.Tensor) -> torch.Tensor:
        t = t.permute(0, 2, 3, 1)[positive]
        w, h = t[:, 2].exp(), t[:, 3].exp()
        return torch.stack([t[:, 0] - w / 2, t[:, 1] - h / 2, t[:, 0] + w / 2, t[:, 1] + h / 2], 1)

    pred, true = corners(box), corners(target)
    return box_iou(pred, true).diagonal() if len(pred) else pred.new_zeros(0)


def _matches(found: torch.Tensor, truth: torch.Tensor) -> int:
    """Detections (rows class, score, box) matched one-to-one to digits (rows class, box) of their class,
    best-scoring detection first."""
    if not len(found) or not len(truth):
        return 0
    iou = box_iou(found[:, 2:], truth[:, 1:])
    iou[found[:, 0][:, None] != truth[:, 0][None, :]] = 0
    taken = torch.zeros(len(truth), dtype=torch.bool)
    count = 0
    for i in found[:, 1].argsort(descending=True).tolist():
        best = iou[i].masked_fill(taken, 0).argmax()
        if iou[i, best] >= IOU_MATCH:
            taken[best] = True
            count += 1
    return count


def train_detector(model: nn.Module, data: DataBundle, settings: TrainSettings) -> dict[str, float]:
    """Train `det_digits` on canvases drawn afresh each epoch (CANVASES of the training digits),
    AdamW with warm-up and cosine; returns the settings used and detection_quality on the `digit_canvas`
    held-out canvases. Runs on settings.compute's device and precision."""
    from compressor.compute.amp import autocast

    if data.spec != "digit_canvas":
        msg = f"det_digits trains on digit_canvas (its canvases carry the boxes), not {data.spec}"
        raise InputError(msg)
    epochs, lr = settings.epochs or EPOCHS, settings.lr or LR
    batch_size, seed = settings.batch_size or BATCH, settings.seed
    torch.manual_seed(seed)
    (digits, labels), _ = digit_splits()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-CANVASES // batch_size)
    schedule = cosine_schedule(optimiser, epochs * steps_per_epoch, WARMUP_EPOCHS * steps_per_epoch)
    num_classes = model.num_classes
    compute, scaler = training_compute(settings)
    device = compute.device
    with compute.placed(model), tqdm(total=epochs * steps_per_epoch, desc="train det_digits", unit="step",
                                     disable=None, leave=False) as bar:
        for epoch in range(epochs):
            canvases = draw_canvases(digits, labels, CANVASES, seed=1000 + 1000 * seed + epoch)
            images, order = canvases.normalised(), torch.randperm(CANVASES)
            model.train()
            for start in range(0, CANVASES, batch_size):
                index = order[start:start + batch_size]
                targets = encode(canvases.boxes[index], images.shape[-1], num_classes)
                targets = Targets([c.to(device) for c in targets.classes], [b.to(device) for b in targets.boxes])
                with autocast(compute.amp, device):
                    outputs = model(images[index].to(device))
                loss = detection_loss(tuple(o.float() for o in outputs), targets)
                optimiser_step(loss, optimiser, schedule, scaler)
                bar.update()
        model.eval()
        quality = detection_quality(model, split_canvases("val", VAL_CANVASES))
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, **quality}

