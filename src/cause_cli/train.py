"""The three training steps of CAUSE (METHOD.md sections 1 to 3).

1. the concept clusterbook, by maximising modularity over backbone tokens;
2. the segmentation head, by concept-wise contrastive learning between a student and its
   EMA teacher, with the concept bank (the front-door adjustment);
3. the cluster probe, by maximising modularity over the teacher head's features.

Labels train nothing but the linear probe, and only on detached features. Each step writes
its own file in the run folder and is skipped when that file already exists.
"""

from __future__ import annotations

import hashlib
import math
import random
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .backbones import FrozenBackbone, load_backbone, refuse_other_backbone
from .config import TrainConfig, apply_reference_recipe
from .data import SegmentationDataset, canonical_name, open_dataset
from .data.loading import LoadReport, ShuffledBatches, iterate_batches
from .devices import autocast, gradient_scaler, resolve_device
from .distributed import REFERENCE_RECIPE_ALONE, SINGLE_PROCESS, ProcessGroup, from_environment
from .distributed import start as join_processes
from .distributed import stop as leave_processes
from .errors import CauseError
from .feature_cache import FeatureCache
from .model.bank import ConceptBank
from .model.contrastive import ContrastiveSettings, concept_contrastive_terms
from .model.heads import ClusterProbe, SegmentationHeads
from .model.modularity import ModularityObjective
from .model.ops import draw_grid_choice, grid_sample_tokens, grid_side, nearest_code
from .paths import write_atomically
from .progress import Reporter
from .runs import CLUSTERBOOK_FILE, FRONT_DOOR_HEAD_FILE, HEAD_FILE, PROBE_FILE, RESUME_FILE, RunDirectory


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
    group: ProcessGroup = SINGLE_PROCESS
    sizes: list[int] = field(default_factory=list)  # every process's images in this step

    @property
    def has_labels(self) -> bool:
        return self.train_set.has_labels

    @property
    def reference_recipe(self) -> bool:
        return self.config.recipe == "reference"

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
        return iterate_batches(
            self.data_at(resolution),
            self.config.batch_size,
            self.load_report,
            batches=order,
            generator=torch.Generator().manual_seed(self.config.seed * 1000 + epoch),
            keep_empty=self.group.distributed,
            workers=self.config.workers,
            pin_memory=self.device.type == "cuda",
        )

    def feature_cache(self, resolution: int) -> FeatureCache | None:
        """The token cache for the training images at ``resolution`` (None without --cache-features)."""
        if not self.config.cache_features:
            return None
        if resolution not in self.caches:
            tokens = (resolution // self.backbone.patch_size) ** 2
            data = self.data_at(resolution)
            # The folder names the images it holds, so other data never reads these tokens.
            listing = "\n".join(str(sample) for sample in getattr(data, "samples", []))
            fingerprint = hashlib.sha1(f"{self.backbone.sha256}\n{listing}".encode()).hexdigest()[:12]
            folder = self.run.path / "feature-cache" / f"{resolution}-{fingerprint}"
            cache = FeatureCache(folder, len(data), tokens, self.backbone.dim)
            message = f"feature cache: {cache.size_bytes / 2**20:.0f} MiB in {cache.path}"
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
            cached = cache.get(batch["index"]) if cache is not None else None
            if cached is not None:
                yield cached.to(self.device, non_blocking=non_blocking), labels
                continue
            images = batch["image"].to(self.device, non_blocking=non_blocking)
            with autocast(self.device):
                tokens = self.backbone(images).float()
            if cache is not None:
                cache.put(batch["index"], tokens)
                # Read back what later epochs will read, so every epoch sees the same values.
                tokens = tokens.half().float()
            yield tokens, labels

    def training_batches(
        self,
        epochs: int,
        title: str,
        end_of_epoch: Callable[[], None] | None = None,
        resolution: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Backbone tokens and labels of every training batch for ``epochs`` epochs (the
        configured share of each), with a progress bar; ``end_of_epoch`` runs after each
        epoch (a learning-rate schedule)."""
        per_epoch = max(1, math.ceil(len(self.shuffled_batches(resolution)) * self.config.epoch_fraction))
        first_epoch, done = self.start
        if self.config.cache_features and self.group.distributed:
            # Rank 0 makes the cache's files; every process then fills in its own images.
            assert self.config.resolution is not None
            if self.group.is_main:
                self.feature_cache(resolution or self.config.resolution)
            self.group.barrier()
        with self.reporter.task(title, epochs * per_epoch) as advance:
            advance(first_epoch * per_epoch + done)
            for epoch in range(first_epoch, epochs):
                raw = self.batches(epoch, resolution)
                skip = done if epoch == first_epoch else 0
                # A resumed step passes over the batches it had done, without the backbone.
                for _ in zip(range(skip), raw, strict=False):
                    pass
                batches = self.tokens_and_labels(raw, resolution)
                for index, batch in zip(range(skip, per_epoch), batches, strict=False):
                    self.position = (epoch, index + 1)
                    self.sizes = self.group.batch_sizes(0 if batch is None else len(batch[0]), self.device)
                    # Processes train in step: where one has no readable image, all pass.
                    if min(self.sizes) > 0:
                        assert batch is not None
                        yield batch
                    advance(1)
                if end_of_epoch is not None:
                    end_of_epoch()

    def restore(self, step: str, apply: Callable[[dict[str, Any]], None]) -> None:
        """With --resume, load the running step's checkpoint into its objects and random
        number generators, and start where it stopped."""
        self.start = (0, 0)
        self.last_checkpoint = time.monotonic()
        self.group.seed_for_dropout(zlib.crc32(f"{self.config.seed}/{step}".encode()))
        if not (self.resume and self.run.has(RESUME_FILE)):
            return
        state = self.run.load_state(RESUME_FILE)
        if state.get("step") != step:
            return
        apply(state["objects"])
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["grid_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
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
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        self.run.save_state(RESUME_FILE, state)
        self.last_checkpoint = time.monotonic()

    def grid_sample(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Grid-sample every tensor with one shared random choice (or return them as they are).

        With several processes the choice is drawn for the global batch, identically in every
        process, and each takes its own images' part.
        """
        if not self.config.grid_sampling:
            return list(tensors)
        batch, num_tokens = tensors[0].shape[:2]
        images = sum(self.sizes) if self.group.distributed else batch
        choice = draw_grid_choice(images, grid_side(num_tokens), self.config.grid_window, self.generator)
        per_image = choice.numel() // images
        choice = choice[self.first_image * per_image : (self.first_image + batch) * per_image]
        return [grid_sample_tokens(tensor, choice, self.config.grid_window) for tensor in tensors]

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

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """This process's part of the mean of ``values`` over all processes (their mean with one)."""
        count = self.group.all_sum(torch.tensor(float(values.numel()), device=values.device))
        return values.sum() * self.group.world_size / count.clamp_min(1)

    def global_loss_value(self, loss: torch.Tensor) -> float:
        """The loss of the global batch, from every process's part of it."""
        return float(self.group.all_sum(loss.detach().clone())) / self.group.world_size


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare(
    config: TrainConfig,
    run: RunDirectory,
    device_name: str,
    reporter: Reporter,
    group: ProcessGroup = SINGLE_PROCESS,
) -> TrainingContext:
    """Check the configuration against the data and the run folder; load the backbone."""
    config.validate()
    if group.distributed and config.recipe == "reference":
        raise CauseError(REFERENCE_RECIPE_ALONE)
    if group.distributed and config.cache_features and not group.single_node:
        raise CauseError("--cache-features works with the processes of one machine only, not across machines.")
    device = join_processes(group, resolve_device(device_name))
    if run.has("run.json"):  # a run made with another backbone is refused before anything loads
        refuse_other_backbone(run.path, run.read_run_info(), config.backbone)
    backbone = load_backbone(config.backbone, device, pos_embed=config.pos_embed)
    if config.resolution is None:
        config.resolution = backbone.spec.resolution
    if config.resolution % backbone.patch_size:
        raise CauseError(f"Resolution {config.resolution} is not a multiple of the patch size {backbone.patch_size}.")
    config.dataset = canonical_name(config.dataset)
    apply_reference_recipe(config)
    train_set = open_dataset(
        config.dataset, config.data_dir, "train", config.resolution, config.val_fraction, crops=True
    )
    if train_set.note:
        reporter.message(train_set.note)
        run.log(train_set.note)
    num_classes = config.num_classes or train_set.infer_num_classes()
    if num_classes is None:
        raise CauseError(
            "The data has no labels and no classes.txt, so say how many clusters to find with --num-classes."
        )
    config.num_classes = num_classes
    if config.recipe == "reference" and not train_set.has_labels:
        raise CauseError("--recipe reference trains with labels (the reference's linear probe); this data has none.")
    if len(train_set) < group.world_size:
        raise CauseError(f"{len(train_set)} training images cannot be shared among {group.world_size} processes.")
    if run.has("run.json"):
        refuse_other_backbone(run.path, run.read_run_info(), backbone)
    run.write_run_info(
        {
            "toolkit_version": __version__,
            "config": config.to_dict(),
            "backbone": backbone.describe(),
            "num_classes": num_classes,
            "class_names": train_set.class_names,
        }
    )
    generator = torch.Generator().manual_seed(config.seed)
    return TrainingContext(config, run, device, backbone, train_set, num_classes, reporter, generator, group=group)


def train(
    config: TrainConfig,
    run_path: Path | str,
    device: str = "auto",
    reporter: Reporter | None = None,
    resume: bool = False,
) -> RunDirectory:
    """Run the three steps into ``run_path``, skipping the steps already done there; with
    ``resume``, an interrupted step continues from its last checkpoint.

    Started by torchrun, the process trains together with the others (see
    :mod:`cause_cli.distributed`); rank 0 reports and writes.
    """
    group = from_environment()
    reporter = (reporter or Reporter()) if group.is_main else Reporter()
    run = RunDirectory(Path(run_path), writes=group.is_main)
    try:
        return _train_steps(config, run, device, reporter, resume, group)
    finally:
        leave_processes(group)


def _train_steps(
    config: TrainConfig, run: RunDirectory, device: str, reporter: Reporter, resume: bool, group: ProcessGroup
) -> RunDirectory:
    context = prepare(config, run, device, reporter, group)
    group.barrier()
    context.resume = resume
    if run.has(RESUME_FILE) and not resume:
        reporter.message(f"{run.path} holds an interrupted step; starting it over (--resume continues it)")
    steps = (
        (CLUSTERBOOK_FILE, "step 1/3 clusterbook", train_clusterbook),
        (HEAD_FILE, "step 2/3 front door", train_front_door),
        (PROBE_FILE, "step 3/3 cluster probe", train_cluster_probe),
    )
    for index, (file_name, title, step) in enumerate(steps):
        if run.has(file_name):
            reporter.message(f"{title}: {file_name} already in {run.path}, skipped")
            run.log(f"{title}: skipped, {file_name} exists")
            continue
        # Each step draws from its own seed, so it computes the same whether or not the
        # steps before it ran in this process.
        seed_everything(config.seed * 1000 + index)
        context.generator.manual_seed(config.seed * 1000 + index)
        started = time.perf_counter()
        step(context, title)
        if run.writes:
            run.file(RESUME_FILE).unlink(missing_ok=True)
        group.barrier()  # the step's file is written before any process reads it
        elapsed = time.perf_counter() - started
        run.log(f"{title}: done in {elapsed:.1f}s")
        reporter.message(f"{title}: done in {elapsed:.1f}s")
    for report in group.gather_objects(context.load_report)[1:]:  # what the other processes met
        assert isinstance(report, LoadReport)
        context.load_report.merge(report)
    for line in context.load_report.lines(config.dataset):
        reporter.message(line)
        run.log(line)
    return run


def train_clusterbook(context: TrainingContext, title: str) -> None:
    """Step one: learn ``M [K, D]`` by maximising the modularity of the token graph."""
    config = context.config
    size = config.clusterbook_size
    clusterbook = torch.nn.Parameter(torch.empty(size, context.backbone.dim, device=context.device))
    torch.nn.init.uniform_(clusterbook, -1.0 / size, 1.0 / size)
    objective = context.group.parallel(
        ModularityObjective([clusterbook], config.modularity_temperature), context.device
    )
    optimiser = torch.optim.Adam([clusterbook], lr=config.learning_rate)

    def restore(state: dict[str, Any]) -> None:
        with torch.no_grad():
            clusterbook.copy_(state["clusterbook"])
        optimiser.load_state_dict(state["optimiser"])

    context.restore("clusterbook", restore)
    last_loss = torch.tensor(math.nan)
    for tokens, _ in context.training_batches(config.epochs_clusterbook, title):
        (sampled,) = context.grid_sample(tokens)
        loss = objective(sampled)[0] * context.batch_share()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        last_loss = loss.detach()
        context.checkpoint(
            "clusterbook", lambda: {"clusterbook": clusterbook.detach(), "optimiser": optimiser.state_dict()}
        )
    context.run.log(f"clusterbook: last modularity loss {context.global_loss_value(last_loss):.5f}")
    context.run.save_tensors(CLUSTERBOOK_FILE, {"clusterbook": clusterbook.detach()})


def _linear_probe_loss(
    context: TrainingContext,
    probe: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    detach: bool = True,
) -> torch.Tensor | None:
    """Cross-entropy of the linear probe over the labelled pixels of the global batch, labels
    at their own size; on detached features unless the reference recipe asks otherwise. None
    when no pixel of the global batch is labelled."""
    valid = (labels >= 0) & (labels < context.num_classes)
    labelled = context.group.all_sum(valid.sum().to(torch.float32))
    if not bool(labelled > 0):
        return None
    logits = probe(features.detach() if detach else features)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    summed = F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid], reduction="sum")
    return summed * context.group.world_size / labelled


def build_heads(config: TrainConfig, dim: int, patch_size: int, num_classes: int) -> SegmentationHeads:
    assert config.resolution is not None
    tokens_per_image = (config.resolution // patch_size) ** 2
    return SegmentationHeads(
        dim, config.reduced_dim, config.projection_dim, num_classes, config.dropout, config.head, tokens_per_image
    )


def train_front_door(context: TrainingContext, title: str) -> None:
    """Step two: student and EMA teacher heads trained by concept-wise contrastive learning."""
    config = context.config
    device = context.device
    clusterbook = context.run.load_tensors(CLUSTERBOOK_FILE, device)["clusterbook"]
    normalised_codes = F.normalize(clusterbook, dim=1)
    heads = build_heads(config, context.backbone.dim, context.backbone.patch_size, context.num_classes).to(device)
    heads.set_clusterbook(clusterbook)
    heads.train()
    reference = context.reference_recipe
    # The reference trains the linear probe with the student, in one optimiser under one
    # gradient clip; by default the probe has its own optimiser and sees detached features.
    trained = heads.student_parameters() + (list(heads.linear_probe.parameters()) if reference else [])
    group = context.group
    student_branch = group.parallel(heads.student_branch(), device)
    linear_probe = group.parallel(heads.linear_probe, device) if context.has_labels else heads.linear_probe
    optimiser = torch.optim.Adam(trained, lr=config.learning_rate, weight_decay=config.weight_decay)
    probe_optimiser = torch.optim.Adam(heads.linear_probe.parameters(), lr=config.learning_rate)
    bank = ConceptBank(config.clusterbook_size, config.projection_dim, config.bank_capacity, device)
    settings = ContrastiveSettings(config.contrastive_temperature, config.positive_threshold, config.negative_threshold)

    progress = {"first_step": True}
    scaler = gradient_scaler(device)

    def restore(state: dict[str, Any]) -> None:
        heads.load_state_dict(state["heads"])
        optimiser.load_state_dict(state["optimiser"])
        probe_optimiser.load_state_dict(state["probe_optimiser"])
        bank.load_state_dict(state["bank"])
        scaler.load_state_dict(state["scaler"])
        progress["first_step"] = bool(state["first_step"])

    def snapshot() -> dict[str, Any]:
        return {
            "heads": heads.state_dict(),
            "optimiser": optimiser.state_dict(),
            "probe_optimiser": probe_optimiser.state_dict(),
            "bank": bank.state_dict(),
            "scaler": scaler.state_dict(),
            "first_step": progress["first_step"],
        }

    context.restore("front_door", restore)
    last_loss = torch.tensor(math.nan)
    batches = context.training_batches(config.epochs_front_door, title, resolution=config.front_door_resolution)
    for tokens, labels in batches:
        with autocast(device):
            if heads.per_token:
                # A per-token head commutes with sampling: sample first, compute 16x less.
                (sampled,) = context.grid_sample(tokens)
                with torch.no_grad():
                    teacher = heads.teacher_projection(heads.teacher(sampled, use_dropout=True))
                student = student_branch(sampled)
            else:
                with torch.no_grad():
                    teacher = heads.teacher_projection(heads.teacher(tokens, use_dropout=True))
                student = student_branch(tokens)
                sampled, student, teacher = context.grid_sample(tokens, student, teacher)
        codes = nearest_code(sampled, clusterbook)
        # Anchors meet the teacher's tokens of the global batch, as in one process.
        all_teacher = group.gather_rows(teacher, context.sizes)
        all_codes = group.gather_rows(codes, context.sizes)
        bank_features, bank_codes = bank.entries() if config.use_bank else (None, None)
        values, defined = concept_contrastive_terms(
            student,
            normalised_codes[codes],
            all_teacher,
            normalised_codes[all_codes],
            context.first_image,
            bank_features,
            normalised_codes[bank_codes] if bank_codes is not None else None,
            settings,
        )
        loss = context.global_mean(values[defined])
        if reference:
            with autocast(device):
                probe_features = heads.teacher(tokens, use_dropout=True).float()
            probe_loss = _linear_probe_loss(context, linear_probe, probe_features, labels)
            total = loss + probe_loss if probe_loss is not None else loss
        else:
            total = loss
        optimiser.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
        scaler.step(optimiser)
        scaler.update()
        if reference and progress["first_step"]:
            # The reference's teacher shares its tensors with the student until the first EMA
            # update, so after one step the teacher is the updated student.
            heads.update_teacher(0.0)
        else:
            heads.update_teacher(config.ema_momentum)
        progress["first_step"] = False
        if config.use_bank:
            # Drawn from the generator every process shares, so their banks stay identical.
            keys = torch.rand(all_codes.numel(), generator=context.generator)
            bank.update(all_codes, all_teacher, keys)
        if context.has_labels and not reference:
            _step_linear_probe(context, heads, linear_probe, tokens, labels, probe_optimiser)
        last_loss = loss.detach()
        context.checkpoint("front_door", snapshot)
    last = context.global_loss_value(last_loss)
    context.run.log(f"front door: last contrastive loss {last:.5f}, bank entries {len(bank)}")
    context.run.save_tensors(HEAD_FILE, heads.state_dict())


def _step_linear_probe(
    context: TrainingContext,
    heads: SegmentationHeads,
    linear_probe: torch.nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    optimiser: torch.optim.Optimizer,
) -> None:
    # The probe reads the teacher's features as inference sees them (no dropout), which also
    # keeps the random number stream, and so the unsupervised steps, independent of labels.
    with torch.no_grad(), autocast(context.device):
        features = heads.teacher(tokens).float()
    loss = _linear_probe_loss(context, linear_probe, features, labels)
    if loss is None:
        return
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def load_heads(
    run: RunDirectory,
    config: TrainConfig,
    dim: int,
    patch_size: int,
    num_classes: int,
    device: torch.device,
    file_name: str = HEAD_FILE,
) -> SegmentationHeads:
    heads = build_heads(config, dim, patch_size, num_classes).to(device)
    if heads.kind == "tr":
        heads.set_clusterbook(run.load_tensors(CLUSTERBOOK_FILE, device)["clusterbook"])
    state = run.load_tensors(file_name, device)
    try:
        heads.load_state_dict(state)
    except RuntimeError as error:
        raise CauseError(f"{run.file(file_name)} does not fit this run's configuration.") from error
    return heads


def train_cluster_probe(context: TrainingContext, title: str) -> None:
    """Step three: centroids ``Phi [C, r]`` by modularity over the teacher head's features.

    By default the teacher is frozen and the linear probe learns on its detached features. The
    reference recipe instead trains the teacher with the linear probe's cross-entropy (labels
    reach the unsupervised features) and rewrites ``head.safetensors``; the step-two head is
    kept as ``head_front_door.safetensors`` so the step can be rerun from it.
    """
    config = context.config
    device = context.device
    reference = context.reference_recipe
    source = HEAD_FILE
    if reference:
        if context.run.writes and not context.run.has(FRONT_DOOR_HEAD_FILE):
            front_door = context.run.file(HEAD_FILE)
            write_atomically(context.run.file(FRONT_DOOR_HEAD_FILE), lambda target: shutil.copyfile(front_door, target))
        source = FRONT_DOOR_HEAD_FILE
    context.group.barrier()
    heads = load_heads(
        context.run, config, context.backbone.dim, context.backbone.patch_size, context.num_classes, device, source
    )
    heads.train()  # dropout on the input features, as during training
    for parameter in heads.parameters():
        parameter.requires_grad_(False)
    head_trained = [*heads.linear_probe.parameters(), *(heads.teacher.parameters() if reference else [])]
    for parameter in head_trained:
        parameter.requires_grad_(True)
    # Several probes from different random starts can learn side by side on the same batches;
    # the one whose last epoch reached the best modularity is kept (labels play no part).
    starts = [ClusterProbe(config.reduced_dim, context.num_classes) for _ in range(max(1, config.probe_restarts))]
    probes = torch.nn.ModuleList(starts).to(device)
    group = context.group
    objective = group.parallel(
        ModularityObjective([probe.centroids for probe in starts], config.modularity_temperature), device
    )
    linear_probe = group.parallel(heads.linear_probe, device) if context.has_labels else heads.linear_probe
    teacher = group.parallel(heads.teacher, device) if reference else heads.teacher
    assert config.epochs_cluster_probe is not None
    epochs = config.epochs_cluster_probe
    optimiser = torch.optim.Adam(probes.parameters(), lr=config.learning_rate)
    epoch_losses = torch.zeros(len(probes))
    epoch_batches = [0]
    head_optimiser = torch.optim.Adam(
        head_trained, lr=config.learning_rate, weight_decay=config.weight_decay if reference else 0.0
    )
    schedulers = [torch.optim.lr_scheduler.StepLR(optimiser, step_size=2, gamma=0.5)]
    if reference:
        schedulers.append(torch.optim.lr_scheduler.StepLR(head_optimiser, step_size=2, gamma=0.5))

    # With float16 autocast the reference recipe back-propagates through the teacher's half
    # precision activations; the scaler keeps those gradients from underflowing.
    scaler = gradient_scaler(device)

    def end_of_epoch() -> None:
        for scheduler in schedulers:
            scheduler.step()
        if context.position[0] + 1 < epochs:  # keep the last epoch's sums
            epoch_losses.zero_()
            epoch_batches[0] = 0

    def restore(state: dict[str, Any]) -> None:
        heads.load_state_dict(state["heads"])
        probes.load_state_dict(state["probes"])
        epoch_losses.copy_(state["epoch_losses"])
        epoch_batches[0] = int(state["epoch_batches"])
        scaler.load_state_dict(state["scaler"])
        optimiser.load_state_dict(state["optimiser"])
        head_optimiser.load_state_dict(state["head_optimiser"])
        for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)

    def snapshot() -> dict[str, Any]:
        return {
            "heads": heads.state_dict(),
            "probes": probes.state_dict(),
            "epoch_losses": epoch_losses.clone(),
            "epoch_batches": epoch_batches[0],
            "scaler": scaler.state_dict(),
            "optimiser": optimiser.state_dict(),
            "head_optimiser": head_optimiser.state_dict(),
            "schedulers": [scheduler.state_dict() for scheduler in schedulers],
        }

    context.restore("cluster_probe", restore)
    batches = context.training_batches(epochs, title, end_of_epoch, resolution=config.front_door_resolution)
    for tokens, labels in batches:
        with torch.set_grad_enabled(reference), autocast(device):
            features = teacher(tokens, use_dropout=True).float()
        (sampled,) = context.grid_sample(features)
        losses = objective(sampled) * context.batch_share()
        # Every process keeps the same start: the one best on the global batches.
        epoch_losses.add_(group.all_sum(losses.detach().clone()).cpu() / group.world_size)
        epoch_batches[0] += 1
        loss = losses.sum()
        probe_loss = None
        if context.has_labels:
            # In the reference recipe the cross-entropy reaches the teacher: one backward for
            # both losses, the head's gradient clipped.
            probe_loss = _linear_probe_loss(context, linear_probe, features, labels, detach=not reference)
        optimiser.zero_grad(set_to_none=True)
        head_optimiser.zero_grad(set_to_none=True)
        total = loss + probe_loss if probe_loss is not None else loss
        scaler.scale(total).backward()
        if reference:
            scaler.unscale_(head_optimiser)
            torch.nn.utils.clip_grad_norm_(head_trained, config.grad_clip)
        scaler.step(optimiser)
        if probe_loss is not None:
            scaler.step(head_optimiser)
        scaler.update()
        context.checkpoint("cluster_probe", snapshot)
    means = epoch_losses / max(1, epoch_batches[0])
    best = int(means.argmin())
    listed = ", ".join(f"{value:.5f}" for value in means.tolist())
    context.run.log(f"cluster probe: last-epoch modularity loss {listed}; kept start {best + 1} of {len(probes)}")
    if reference:
        context.run.save_tensors(HEAD_FILE, heads.state_dict())
    tensors = {"centroids": starts[best].centroids.detach()}
    tensors.update({f"linear_probe.{key}": value for key, value in heads.linear_probe.state_dict().items()})
    context.run.save_tensors(PROBE_FILE, tensors)
