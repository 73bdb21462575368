"""What every training step shares: batches of backbone tokens, the feature cache,
checkpoints for resuming, and the process group that several processes train in."""

from __future__ import annotations

import functools
import math
import random
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..backbones import FrozenBackbone
from ..config import TrainConfig
from ..data import SegmentationDataset, open_dataset
from ..data.loading import LoadReport, ShuffledBatches, iterate_batches
from ..data.transforms import normalise_pixels
from ..devices import autocast, loader_workers
from ..distributed import SINGLE_PROCESS, ProcessGroup
from ..errors import CauseError
from ..feature_cache import FeatureCache, cache_folder
from ..model.ops import draw_grid_choice, grid_positions, grid_side, take_tokens
from ..progress import Reporter
from ..runs import LOG_FILE, RESUME_FILE, RunDirectory
from .history import STEPS, History


@dataclass
class TrainingContext:
    config: TrainConfig
    run: RunDirectory
    device: torch.device
    backbone: FrozenBackbone
    train_set: SegmentationDataset
    num_classes: int
    reporter: Reporter
    generator: torch.Generator
    load_report: LoadReport = field(default_factory=LoadReport)
    other_resolutions: dict[int, SegmentationDataset] = field(default_factory=dict)
    resume: bool = False
    position: tuple[int, int] = (0, 0)  # (epoch, batches of it done) of the running step
    start: tuple[int, int] = (0, 0)  # where the running step (re)starts
    last_checkpoint: float = field(default_factory=time.monotonic)
    caches: dict[int, FeatureCache] = field(default_factory=dict)
    cached_resolutions: set[int] = field(default_factory=set)  # whose tokens are cached (prepare decides)
    group: ProcessGroup = SINGLE_PROCESS
    sizes: list[int] = field(default_factory=list)  # every process's images in this step
    backbone_passes: int = 0  # batches this process sent through the backbone
    updates: tuple[int, int] = (0, 0)  # (batches done, batches in all) of the running step

    @property
    def has_labels(self) -> bool:
        return self.train_set.has_labels

    @property
    def reference_recipe(self) -> bool:
        return self.config.recipe == "reference"

    @staticmethod
    def epochs(resolved: int | None) -> int:
        """A step's epochs, which :meth:`TrainConfig.resolve_schedule` has filled in."""
        assert resolved is not None, "the schedule is resolved when the run is prepared"
        return resolved

    def data_at(self, resolution: int | None) -> SegmentationDataset:
        """The training images at ``resolution`` (None: the run's)."""
        if resolution is None or resolution == self.config.resolution:
            return self.train_set
        if resolution not in self.other_resolutions:
            config = self.config
            self.other_resolutions[resolution] = open_dataset(
                config.dataset, config.data_dir, "train", resolution, config.val_fraction, crops=True
            )
        return self.other_resolutions[resolution]

    def shuffled_batches(self, resolution: int | None = None) -> ShuffledBatches:
        group = self.group
        data = self.data_at(resolution)
        return ShuffledBatches(len(data), self.config.batch_size, self.config.seed, group.rank, group.world_size)

    def batches(self, epoch: int, resolution: int | None = None) -> Iterator[dict[str, Any]]:
        """This process's shuffled batches of one epoch; unreadable files are skipped and
        recorded (with several processes, a batch of nothing else comes as an empty dict)."""
        order = self.shuffled_batches(resolution)
        order.set_epoch(epoch)
        data = self.data_at(resolution)
        assert self.config.resolution is not None
        cache = self.feature_cache(resolution or self.config.resolution)
        # Images whose tokens are cached are not decoded, only their labels read.
        data.pixels_not_needed = cache.snapshot() if cache is not None else None
        return iterate_batches(
            data,
            self.config.batch_size,
            self.load_report,
            batches=order,
            generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch),
            keep_empty=self.group.distributed,
            num_classes=self.num_classes,
            workers=loader_workers(self.config.workers, self.device, self.group.local_world_size),
            pin_memory=self.device.type == "cuda",
        )

    def feature_cache(self, resolution: int) -> FeatureCache | None:
        """The token cache for the training images at ``resolution`` (None where they are not cached)."""
        if resolution not in self.cached_resolutions:
            return None
        if resolution not in self.caches:
            tokens = (resolution // self.backbone.patch_size) ** 2
            data = self.data_at(resolution)
            folder = cache_folder(self.run.path, resolution, self.backbone.sha256, getattr(data, "samples", []))
            cache = FeatureCache(folder, len(data), tokens, self.backbone.dim)
            message = f"feature cache: {cache.size_bytes / 2**20:.0f} MiB in {cache.path}"
            if cache.damaged:
                message += f"; {cache.damaged} image(s) found damaged there, computed again"
            self.reporter.message(message)
            self.run.log(message)
            self.caches[resolution] = cache
        return self.caches[resolution]

    def tokens_and_labels(
        self, batches: Iterator[dict[str, Any]], resolution: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor] | None]:
        non_blocking = self.device.type == "cuda"
        assert self.config.resolution is not None
        cache = self.feature_cache(resolution or self.config.resolution)
        for batch in batches:
            if not batch:
                yield None
                continue
            labels = batch["label"].to(self.device, non_blocking=non_blocking)
            if cache is None:
                with autocast(self.device):
                    tokens = self.backbone(normalise_pixels(batch["image"], self.device)).float()
                self.backbone_passes += 1
                yield tokens, labels
                continue
            indices = batch["index"]
            cached = torch.from_numpy(cache.has(indices))
            if not cached.all():
                # Only the images whose tokens are not in yet: the others were not even decoded.
                images = normalise_pixels(batch["image"][~cached], self.device)
                with autocast(self.device):
                    cache.put(indices[~cached], self.backbone(images).float())
                self.backbone_passes += 1
            # Read back, so this epoch sees the float16 values every later epoch will.
            tokens = cache.get(indices)
            assert tokens is not None
            yield tokens.to(self.device, non_blocking=non_blocking), labels

    def training_batches(
        self,
        epochs: int,
        title: str,
        end_of_epoch: Callable[[], None] | None = None,
        resolution: int | None = None,
    ) -> Generator[tuple[torch.Tensor, torch.Tensor], None, None]:
        """Backbone tokens and labels of every training batch for ``epochs`` epochs (the
        configured share of each), with a progress bar; ``end_of_epoch`` runs after each
        epoch (a learning-rate schedule)."""
        per_epoch = max(1, math.ceil(len(self.shuffled_batches(resolution)) * self.config.epoch_fraction))
        first_epoch, done = self.start
        assert self.config.resolution is not None
        if (resolution or self.config.resolution) in self.cached_resolutions and self.group.distributed:
            # Rank 0 makes the cache's files; every process then fills in its own images.
            if self.group.is_main:
                self.feature_cache(resolution or self.config.resolution)
            self.group.barrier()
        total = epochs * per_epoch
        already_done = min(total, first_epoch * per_epoch + done)
        trained = 0
        passes_before = self.backbone_passes
        with self.reporter.task(title, total, done=already_done) as advance:
            for epoch in range(first_epoch, epochs):
                raw = self.batches(epoch, resolution)
                skip = done if epoch == first_epoch else 0
                # A resumed step passes over the batches it had done, without the backbone.
                for _ in zip(range(skip), raw, strict=False):
                    pass
                batches = self.tokens_and_labels(raw, resolution)
                for index, batch in zip(range(skip, per_epoch), batches, strict=False):
                    self.position = (epoch, index + 1)
                    self.updates = (epoch * per_epoch + index + 1, total)
                    self.sizes = self.group.batch_sizes(0 if batch is None else len(batch[0]), self.device)
                    # Processes train in step: where one has no readable image, all pass.
                    if min(self.sizes) > 0:
                        assert batch is not None
                        trained += 1
                        yield batch
                    advance(1)
                if end_of_epoch is not None:
                    end_of_epoch()
        if total and not trained and not already_done and self.load_report.skipped:
            for line in self.load_report.lines(self.config.dataset, self.num_classes):
                self.run.log(line)
            raise CauseError(
                f"No training image could be read (all {len(self.load_report.skipped)} tried of "
                f"{len(self.data_at(resolution))} were unreadable, listed in {self.run.file(LOG_FILE)}), "
                "so nothing was trained."
            )
        # What this process did, so that a resumed run shows the work it did not redo.
        self.run.log(
            f"{title}: {trained} of {total} batches trained here ({already_done} done before), "
            f"{self.backbone_passes - passes_before} backbone passes"
        )

    def restore(self, step: str, apply: Callable[[dict[str, Any]], None]) -> None:
        """With --resume, load the running step's checkpoint into its objects and random
        number generators, and start where it stopped."""
        self.start = (0, 0)
        self.last_checkpoint = time.monotonic()
        self.group.seed_for_dropout(zlib.crc32(f"{self.config.seed}/{step}".encode()))
        if not (self.resume and self.run.has(RESUME_FILE)):
            self._start_history(step, 0)
            return
        state = self.run.load_state(RESUME_FILE)
        if state.get("step") != step:
            self._start_history(step, 0)
            return
        # Checkpoints from before the history kept no update count: their rows are all kept.
        self._start_history(step, int(state.get("updates", 1 << 62)))
        apply(state["objects"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["grid_rng"])
        restore_cuda_rng(state, self.device)
        self.start = (int(state["epoch"]), int(state["batch"]))
        self.group.seed_for_dropout(zlib.crc32(f"{self.config.seed}/{step}/{self.start}".encode()))
        message = f"{step}: resumed at epoch {self.start[0] + 1}, batch {self.start[1]}"
        self.reporter.message(message)
        self.run.log(message)

    def checkpoint(self, step: str, objects: Callable[[], dict[str, Any]]) -> None:
        """After a batch: save the step's state when the checkpoint interval has passed (rank 0
        only: the state is the same in every process but for the dropout masks' generator)."""
        if not self.run.writes or time.monotonic() - self.last_checkpoint < self.config.checkpoint_seconds:
            return
        state: dict[str, Any] = {
            "step": step,
            "epoch": self.position[0],
            "batch": self.position[1],
            "torch_rng": torch.get_rng_state(),
            "grid_rng": self.generator.get_state(),
            "objects": objects(),
            "updates": self.updates[0],
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        self.run.save_state(RESUME_FILE, state)
        self.last_checkpoint = time.monotonic()

    @functools.cached_property
    def history(self) -> History:
        return History(self.run)

    def _start_history(self, step: str, done: int) -> None:
        if step in STEPS and self.group.is_main:
            self.history.start_step(step, done)

    def record_history(
        self,
        step: str,
        losses: dict[str, torch.Tensor | None],
        optimiser: torch.optim.Optimizer,
        bank_entries: int | None = None,
    ) -> None:
        """After an update: a row of ``history.csv`` when one is due (every process takes
        part: the losses are those of the global batch)."""
        done, total = self.updates
        if not self.history.due(done, total):
            return
        values = {name: None if loss is None else self.global_loss_value(loss) for name, loss in losses.items()}
        if self.group.is_main:
            row = {"step": step, "update": done, "updates": total, "epoch": self.position[0] + 1, **values}
            self.history.add({**row, "learning_rate": optimiser.param_groups[0]["lr"], "bank_entries": bank_entries})

    def grid_positions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The tokens grid sampling keeps in each image of ``tokens [B, P, ...]``, ``[B, S]``,
        by one random choice (None without grid sampling: every token is kept).

        With several processes the choice is drawn for the global batch, identically in every
        process, and each takes its own images' part.
        """
        if not self.config.grid_sampling:
            return None
        batch, num_tokens = tokens.shape[:2]
        images = sum(self.sizes) if self.group.distributed else batch
        window = self.config.grid_window
        choice = draw_grid_choice(images, grid_side(num_tokens), window, self.generator)
        per_image = choice.numel() // images
        choice = choice[self.first_image * per_image : (self.first_image + batch) * per_image]
        return grid_positions(choice, batch, num_tokens, window).to(tokens.device)

    def grid_sample(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Grid-sample every tensor with one shared random choice (or return them as they are)."""
        positions = self.grid_positions(tensors[0])
        if positions is None:
            return list(tensors)
        return [take_tokens(tensor, positions) for tensor in tensors]

    @property
    def first_image(self) -> int:
        """Where this process's images start in the global batch."""
        return sum(self.sizes[: self.group.rank]) if self.group.distributed else 0

    def batch_share(self) -> float:
        """The factor that turns a mean over this process's images into its part of the mean
        over the global batch (gradients are averaged over processes): 1 for one process."""
        if not self.group.distributed:
            return 1.0
        return self.sizes[self.group.rank] * self.group.world_size / sum(self.sizes)

    def global_mean(self, values: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """This process's part of the mean of ``values`` (those ``kept``, a boolean mask) over
        all processes (their mean with one). The count stays on the device: no host sync."""
        if kept is None:
            kept = torch.ones_like(values, dtype=torch.bool)
        count = self.group.all_sum(kept.sum().to(values.dtype))
        total = torch.where(kept, values, torch.zeros_like(values)).sum()
        return total * self.group.world_size / count.clamp_min(1)

    def global_loss_value(self, loss: torch.Tensor) -> float:
        """The loss of the global batch, from every process's part of it."""
        # On this process's device: NCCL refuses a CPU tensor, which is what a step that ran no
        # batch (zero epochs, a resume after its last batch) still holds.
        local = loss.detach().to(self.device, torch.float32).reshape(()).clone()
        return float(self.group.all_sum(local)) / self.group.world_size


def restore_cuda_rng(state: dict[str, Any], device: torch.device) -> None:
    """Restore the generator of this process's GPU from a checkpoint: one state (this
    toolkit's), or one per GPU that was visible (older checkpoints), taken by index when that
    GPU is still there. A resume on fewer or no GPUs starts that generator afresh."""
    saved = state.get("cuda_rng")
    if saved is None or device.type != "cuda":
        return
    if isinstance(saved, list | tuple):
        index = device.index or 0
        if index >= len(saved):
            return
        saved = saved[index]
    torch.cuda.set_rng_state(saved, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
