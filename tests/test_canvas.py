"""The digit_canvas source and det_digits' targets: canvases drawn from a seed, held-out canvases pasting
held-out digits only, and targets that decode back to the boxes they were made from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.data import UNLABELLED, load_data
from compressor.data.canvas import (
    DIGITS,
    NO_BOX,
    SIZE,
    TRAIN_CANVASES,
    VAL_CANVASES,
    digit_splits,
    draw_canvases,
    split_canvases,
)
from compressor.errors import InputError
from compressor.models.det_digits import BOX
from compressor.models.det_training import detection_quality, encode


@pytest.fixture(scope="module")
def canvas():
    return load_data("digit_canvas")


@pytest.fixture(scope="module")
def drawn():
    (digits, labels), _ = digit_splits()
    return draw_canvases(digits, labels, 200, seed=5)


def test_source_gives_unlabelled_canvases(canvas):
    assert canvas.spec == "digit_canvas" and not canvas.labelled
    assert canvas.input_shape == (3, SIZE, SIZE)
    assert (len(canvas.train), len(canvas.val)) == (TRAIN_CANVASES, VAL_CANVASES)
    x, y = next(iter(canvas.loader("train", batch_size=16, shuffle=True)))
    assert x.shape == (16, 3, SIZE, SIZE) and bool((y == UNLABELLED).all())
    assert abs(float(canvas.train.images.mean())) < 0.1 and 0.9 < float(canvas.train.images.std()) < 1.1


def test_canvases_are_drawn_from_their_seed():
    first, again = split_canvases("val", 16), split_canvases("val", 16)
    assert torch.equal(first.images, again.images) and torch.equal(first.boxes, again.boxes)
    assert not torch.equal(split_canvases("train", 16).images, first.images)


def test_boxes_fit_the_canvas_and_never_overlap(drawn):
    counts = (drawn.boxes[:, :, 0] != NO_BOX).sum(1)
    assert int(counts.min()) >= DIGITS[0] and int(counts.max()) == DIGITS[1]
    for rows in drawn.boxes:
        rows = rows[rows[:, 0] != NO_BOX]
        assert bool(((rows[:, 1:] >= 0) & (rows[:, 1:] <= SIZE)).all())
        for i in range(len(rows)):
            for j in range(i):
                a, b = rows[i, 1:], rows[j, 1:]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]


def test_held_out_canvases_paste_held_out_digits_only():
    """A canvas drawn from a single digit has it wherever a box is: the val split's digits are not the train's."""
    (train, _), (val, val_labels) = digit_splits()
    assert float(torch.cdist(val.flatten(1), train.flatten(1)).min()) > 0  # no image in both
    held_out = split_canvases("val", 8)
    assert torch.equal(held_out.images, draw_canvases(val, val_labels, 8, seed=1).images)  # from val's digits
    one = draw_canvases(val[:1], val_labels[:1], 4, seed=0)
    assert bool((one.boxes[:, :, 0][one.boxes[:, :, 0] != NO_BOX] == val_labels[0]).all())


class Oracle(nn.Module):
    """Outputs the encoded targets of fixed canvases as the detector's maps: a perfect detector."""

    def __init__(self, boxes: torch.Tensor) -> None:
        super().__init__()
        self.targets = encode(boxes, SIZE, 10)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        index = slice(self.seen, self.seen + len(x))
        self.seen += len(x)
        maps = []
        for classes, boxes in zip(self.targets.classes, self.targets.boxes, strict=True):
            logits = nn.functional.one_hot(classes[index], 11).permute(0, 3, 1, 2).float() * 20
            maps.append(torch.cat([boxes[index], logits], 1))
        return tuple(maps)


def test_targets_decode_back_to_their_boxes(drawn):
    """A model that outputs the encoded targets scores perfectly: encode, decode and the matching agree."""
    quality = detection_quality(Oracle(drawn.boxes), drawn, batch_size=64)
    assert quality["cell_accuracy"] == 100.0 and quality["background_accuracy"] == 100.0
    assert quality["box_iou"] == pytest.approx(1.0, abs=1e-5)
    assert quality["precision"] == 100.0 and quality["recall"] == 100.0


def test_targets_fill_one_cell_per_digit_on_the_head_of_its_size(drawn):
    targets = encode(drawn.boxes, SIZE, 10)
    digits = int((drawn.boxes[:, :, 0] != NO_BOX).sum())
    assert sum(int((c != 10).sum()) for c in targets.classes) == digits
    assert [tuple(c.shape[1:]) for c in targets.classes] == [(8, 8), (4, 4)]
    assert all(b.shape[1] == BOX for b in targets.boxes)
    small = (drawn.boxes[:, :, 3:5] - drawn.boxes[:, :, 1:3]).amax(-1) <= 20
    assert int((targets.classes[0] != 10).sum()) == int((small & (drawn.boxes[:, :, 0] != NO_BOX)).sum())


def test_a_wrong_detector_is_scored_low(drawn):
    """The oracle with every class shifted by one: no cell and no detection is right."""
    oracle = Oracle(drawn.boxes)
    for c in oracle.targets.classes:
        c[c != 10] = (c[c != 10] + 1) % 10
    quality = detection_quality(oracle, drawn, batch_size=64)
    assert quality["cell_accuracy"] == 0.0 and quality["precision"] == 0.0 and quality["recall"] == 0.0
    assert quality["box_iou"] == pytest.approx(1.0, abs=1e-5)


def test_detector_trains_on_canvases_only(digits):
    from compressor.models.det_digits import det_digits
    from compressor.models.det_training import train_detector
    from compressor.models.recipes import TrainSettings

    with pytest.raises(InputError, match="trains on digit_canvas"):
        train_detector(det_digits(), digits, TrainSettings(epochs=1))
