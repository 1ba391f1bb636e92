"""A DataBundle from the user's own batches: a DataLoader, or any iterable of tensors or (tensor, label).

The job needs a calibration split (scoring, fine-tuning) and a held-out split
(fidelity) that it never trains on. From the user's batches it takes at most
`limit` items, holding out every fifth one, so memory is bounded by `limit`
whatever the size of the user's dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch.utils.data import TensorDataset

from compressor.data.bundle import UNLABELLED, DataBundle
from compressor.errors import InputError

DEFAULT_LIMIT = 2048  # items read from the user's batches, at most
HOLD_OUT_EVERY = 5  # every fifth item is held out for fidelity (20%)


def _split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    msg = (f"data batches must be tensors or (tensor, label) pairs, got {type(batch).__name__}"
           + (f" of {type(batch[0]).__name__}" if isinstance(batch, (tuple, list)) and batch else ""))
    raise InputError(msg)


def from_batches(batches: Iterable, limit: int = DEFAULT_LIMIT, name: str = "batches") -> DataBundle:
    """Read up to `limit` items of `batches` into a train/held-out DataBundle. Items must be N x C x H x W
    float tensors; labels (class indices) are optional: without them the data is unlabelled."""
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    seen = 0
    labelled: bool | None = None
    for batch in batches:
        x, y = _split_batch(batch)
        if x.dim() != 4 or not x.is_floating_point():
            msg = f"data batches must be float N x C x H x W tensors, got {x.dtype} of shape {tuple(x.shape)}"
            raise InputError(msg)
        if labelled is None:
            labelled = y is not None
        if (y is not None) != labelled or (y is not None and len(y) != len(x)):
            msg = "every data batch must carry labels (one per image) or none must"
            raise InputError(msg)
        take = min(len(x), limit - seen)
        xs.append(x[:take].detach().float().cpu())
        ys.append(y[:take].detach().long().cpu() if y is not None else torch.full((take,), UNLABELLED))
        seen += take
        if seen >= limit:
            break
    if seen < 2 * HOLD_OUT_EVERY:
        msg = f"the data gave {seen} images; at least {2 * HOLD_OUT_EVERY} are needed (a fifth are held out)"
        raise InputError(msg)
    x, y = torch.cat(xs), torch.cat(ys)
    if len({tuple(t.shape[1:]) for t in xs}) != 1:
        msg = "data batches disagree on the image shape"
        raise InputError(msg)
    held_out = torch.arange(len(x)) % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1
    classes = int(y.max()) + 1 if labelled else 0
    return DataBundle(name, TensorDataset(x[~held_out], y[~held_out]), TensorDataset(x[held_out], y[held_out]),
                      classes, tuple(x.shape[1:]), labelled=bool(labelled), digest=digest(x, y))


def digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 of the images (shape and values) and labels read: what names the user's batches in a run's
    resume check, where a spec string names a built-in source."""
    h = hashlib.sha256()
    for t in (x, y):
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()
