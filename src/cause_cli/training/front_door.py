"""Step two: the segmentation head, trained by concept-wise contrastive learning between
a student and its EMA teacher with the concept bank: the front-door adjustment (METHOD.md
section 2)."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..devices import autocast, gradient_scaler
from ..model.bank import ConceptBank
from ..model.contrastive import ContrastiveSettings, concept_contrastive_terms
from ..model.ops import nearest_code, take_tokens
from ..trained import build_heads, load_clusterbook, save_heads
from .context import TrainingContext
from .estimate import UPDATES_BEFORE_ESTIMATE, UpdateTimes, estimate_line, front_door_seconds
from .linear_probe import linear_probe_loss, step_linear_probe


def train_front_door(context: TrainingContext, title: str) -> None:
    """Step two: student and EMA teacher heads trained by concept-wise contrastive learning."""
    config = context.config
    device = context.device
    clusterbook = load_clusterbook(context.run, device, config.clusterbook_size, context.backbone.dim)
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
    assert config.positive_threshold is not None and config.negative_threshold is not None  # resolved in prepare
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
    last_loss = torch.tensor(math.nan, device=context.device)
    batches = context.training_batches(
        context.epochs(config.epochs_front_door), title, resolution=config.front_door_resolution
    )
    clock = FrontDoorClock(context, bank)
    for tokens, labels in batches:
        clock.update_starts()
        by_code = bank.by_code(normalised_codes) if config.use_bank else None
        positions = context.grid_positions(tokens)
        # The TR head quantises every token; found once, the codes serve both heads and the loss.
        token_codes = None if heads.per_token else nearest_code(tokens, clusterbook)
        if token_codes is not None:
            codes = token_codes if positions is None else take_tokens(token_codes, positions)
        else:
            codes = nearest_code(tokens if positions is None else take_tokens(tokens, positions), clusterbook)
        with autocast(device), torch.no_grad():
            # Only the sampled tokens' features are computed: the rest are never compared.
            teacher = heads.teacher_projection(
                heads.teacher(tokens, use_dropout=True, positions=positions, token_codes=token_codes)
            )
        # Anchors meet the teacher's tokens of the global batch, as in one process.
        all_teacher = group.gather_rows(teacher, context.sizes)
        all_codes = group.gather_rows(codes, context.sizes)
        candidates = [F.normalize(all_teacher.float().flatten(0, 1), dim=-1)]
        if by_code is not None:
            candidates.append(by_code.features.flatten(0, 1))
        with autocast(device):
            student, student_inputs, through_projection = student_branch(tokens, candidates, positions, token_codes)
        teacher_through = None
        if through_projection is not None:
            teacher_through = through_projection[0]
            if by_code is not None:
                by_code = by_code.through(through_projection[1])
        values, defined = concept_contrastive_terms(
            student,
            normalised_codes[codes],
            all_teacher,
            normalised_codes[all_codes],
            context.first_image,
            by_code,
            settings,
            student_inputs,
            teacher_through,
        )
        loss = context.global_mean(values, defined)
        if reference:
            with autocast(device):
                probe_features = heads.teacher(tokens, use_dropout=True).float()
            probe_loss = linear_probe_loss(context, linear_probe, probe_features, labels)
            total = loss + probe_loss if probe_loss is not None else loss
        else:
            probe_loss = None
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
            step_linear_probe(context, heads, linear_probe, tokens, labels, probe_optimiser)
        last_loss = loss.detach()
        context.record_history("front_door", {"loss": loss, "probe_loss": probe_loss}, optimiser,
                               len(bank) if config.use_bank else None)  # fmt: skip
        clock.update_done()
        context.checkpoint("front_door", snapshot)
    last = context.global_loss_value(last_loss)
    context.run.log(f"front door: last contrastive loss {last:.5f}, bank entries {len(bank)}")
    save_heads(context.run, heads)


class FrontDoorClock:
    """Times the first updates of the front door and then says how long it will take
    (:mod:`.estimate`); after that it costs nothing (reading the bank's size waits for a GPU)."""

    def __init__(self, context: TrainingContext, bank: ConceptBank) -> None:
        self.context, self.bank = context, bank
        self.times = UpdateTimes()
        self.finished = False
        self.last = time.perf_counter()  # the update's batch is made before it starts
        self.passes = context.backbone_passes
        self.entries = 0

    def update_starts(self) -> None:
        if not self.finished:
            self.entries = len(self.bank)

    def update_done(self) -> None:
        if self.finished:
            return
        context = self.context
        now = time.perf_counter()
        self.times.add(now - self.last, self.entries, context.backbone_passes != self.passes)
        self.last, self.passes = now, context.backbone_passes
        if len(self.times.seconds) < UPDATES_BEFORE_ESTIMATE:
            return
        self.finished = True
        done, total = context.updates
        filled = self.bank.filled.cpu().numpy()
        left = front_door_seconds(self.times, filled, self.bank.capacity, done, total)
        if left is not None and done < total:
            line = estimate_line(left, float(np.median(self.times.fitted()[0])), context.device.type == "cpu")
            context.reporter.message(line)
            context.run.log(line)
