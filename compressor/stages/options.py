"""Everything a prune can be told besides the model, data, target and profile."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from os import PathLike, fspath

from compressor.errors import InputError

# how the search proposes removal sets: the knapsack over the criterion's single-unit scores, or
# greedy removal scored by the whole set's measured KL (search/greedy.py)
SELECTIONS = ("knapsack", "greedy")
PRECISIONS = ("fp32", "int8", "auto")
# what the search may do to a block: remove it (or a branch), slim its inner channels (stages/width.py), or either
MOVES = ("depth", "width", "depth+width")


@dataclass
class PruneOptions:
    """The CLI's settings, as keyword options of `compressor.prune` (None: chosen for the model's lineage)."""

    criterion: str = "cka"
    calibration_size: int = 512  # images for scoring
    finetune_epochs: int = 4
    finetune_lr: float | None = None  # None: 0.02, or 0.002 for models with their own (ImageNet) weights
    freeze_batchnorm: bool | None = None  # None: frozen exactly when the pretrained learning rate is chosen
    mimic: bool | None = None  # also match block outputs (finetune/mimic.py); None: for pretrained models
    selection: str | None = None  # "knapsack" or "greedy"; None: greedy for pretrained models
    min_blocks_per_stage: int = 1
    max_trials: int = 8  # candidates measured by the search, at most
    merge: bool = False  # also offer "linearise and merge" units (criterion cka or random)
    seed: int = 0
    latency_table: str | None = None  # reuse a table from `compressor profile` (same model, profile)
    repeats: int = 3  # SR-init seeds
    precision: str = "fp32"  # "fp32", "int8" (the runtime's own quantizer) or "auto" (whichever measures best)
    int8_calibration_size: int | None = None  # images each INT8 candidate and the delivered INT8 are calibrated
    # on; None: the quantizer's own CALIBRATION_SIZE (compressor/quantize/images.py, not imported here: it loads torch)
    logits: list[str] | None = None  # names of the outputs that are class logits (None: the 2-D outputs)
    moves: str = "depth"  # "depth", "width" or "depth+width"
    channel_criterion: str | None = None  # which channels a width unit keeps; None: the criterion's own, else peel
    # where and how learning and scoring run (compressor/compute/, docs/scale.md)
    train_device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N, mps
    amp: str = "auto"  # fine-tuning on CUDA: auto (bf16 where supported, else fp16 + grad scaler), off, bf16, fp16
    finetune_batch: int = 32  # images per fine-tuning step, all processes together
    loader_workers: int | None = None  # DataLoader processes per process; None: 0 for in-memory tensors, else CPUs - 1

    @classmethod
    def from_kwargs(cls, **options: object) -> PruneOptions:
        """Options from keyword arguments; an unknown keyword is an InputError naming the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            msg = f"unknown prune option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            raise InputError(msg)
        if isinstance(options.get("logits"), str):
            options["logits"] = [n for n in options["logits"].split(",") if n]
        if isinstance(options.get("latency_table"), PathLike):
            options["latency_table"] = fspath(options["latency_table"])  # a Path from Python, as the CLI's string
        return cls(**options)

    def check(self) -> None:
        """Refuse options that cannot work, before anything is measured or written (the train device first:
        it needs nothing else loaded)."""
        self._check_compute()
        from compressor.criteria import get_criterion

        get_criterion(self.criterion)
        if self.merge:
            from compressor.criteria.merges import check_criterion

            check_criterion(self.criterion)
        if self.moves not in MOVES:
            msg = f"unknown moves {self.moves!r}; known: {', '.join(MOVES)}"
            raise InputError(msg)
        if self.moves != "depth" or self.channel_criterion is not None:
            from compressor.criteria.channels import get_channel_criterion
            from compressor.criteria.width import check_criterion as check_width

            check_width(self.criterion)
            get_channel_criterion(self.channel_criterion or "peel")
        if self.precision not in PRECISIONS:
            msg = f"unknown precision {self.precision!r}; known: {', '.join(PRECISIONS)}"
            raise InputError(msg)
        if self.selection is not None and self.selection not in SELECTIONS:
            msg = f"unknown selection {self.selection!r}; known: {', '.join(SELECTIONS)}"
            raise InputError(msg)
        for name in ("calibration_size", "int8_calibration_size", "max_trials", "repeats", "finetune_batch"):
            value = getattr(self, name)
            if name == "int8_calibration_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                msg = f"{name} must be a positive integer, got {value!r}"
                raise InputError(msg)
        for name in ("finetune_epochs", "min_blocks_per_stage"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                msg = f"{name} must be zero or a positive integer, got {value!r}"
                raise InputError(msg)

    def _check_compute(self) -> None:
        """The train device must be here (InputError in well under a second otherwise) and the precision
        possible on it."""
        from compressor.compute.amp import resolve_amp
        from compressor.compute.device import resolve_device
        from compressor.compute.group import layout

        _, _, local_rank, local_size = layout()
        resolve_amp(self.amp, resolve_device(self.train_device, local_rank, local_size))
        workers = self.loader_workers
        if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
            msg = f"loader_workers must be None or zero or a positive integer, got {workers!r}"
            raise InputError(msg)

    def to_dict(self) -> dict:
        return asdict(self)
