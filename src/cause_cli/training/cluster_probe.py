"""Step three: the cluster probe, centroids ``Phi [C, r]`` over the teacher head's features
(METHOD.md section 3).

The paper starts the centroids at random and fits them by modularity (``probe_init="random"``,
the reference recipe). By default they start instead from spherical k-means on a sample of
the teacher's features of the training images (k-means++ seeding, restarts ranked by mean
cosine, no labels), and the modularity refinement runs only when asked for
(``probe_refine``): on folders of a few hundred images a random start often leaves classes
without a centroid, and refining k-means centroids by modularity lowered their mIoU in our
measurements (docs/quality.md). Also by default (``probe_space="whitened"``) the centroids
live in the teacher's feature space whitened by a fit on the same sample, where k-means
separates classes that the front door packed close together; the whitening is saved with
the centroids and applied at inference. Where the k-means fits disagree (``probe_spread``,
model/spread.py), the clusters also get a spread: equal Gaussians sharing one diagonal
covariance, fitted from the k-means partition.

The starts and spaces are variants registered in probe_kinds.py; this step runs the ones the
configuration names, and trained.py writes what they made.
"""

from __future__ import annotations

from typing import Any

import torch

from ..devices import autocast, gradient_scaler
from ..model.heads import SegmentationHeads
from ..model.kmeans import draw_tokens, gather_tokens, tokens_per_image
from ..model.modularity import ModularityObjective
from ..runs import FRONT_DOOR_HEAD_FILE, HEAD_FILE
from ..trained import keep_front_door_heads, load_heads, save_heads, save_probe
from .context import TrainingContext
from .linear_probe import linear_probe_loss
from .probe_kinds import PROBE_SPACES, PROBE_STARTS


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
        keep_front_door_heads(context.run)
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
    group = context.group
    # The start and the space are variants (probe_kinds.py): what they need, and what they make.
    start, space = PROBE_STARTS[config.probe_init], PROBE_SPACES[config.probe_space]
    points = None
    if start.reads_features or space.reads_features:
        points = sample_teacher_features(context, heads, title)
    whitening = space.fit(context, points)
    if whitening is not None and points is not None:
        points = whitening(points)
    # Several probes (from different random starts) can learn side by side on the same batches;
    # the one whose last epoch reached the best modularity is kept (labels play no part).
    starts = start.make(context, points, whitening)
    probe_space = whitening.to(device) if whitening is not None else torch.nn.Identity()
    probes = torch.nn.ModuleList(starts).to(device)
    refine = config.refines_probe
    probes.requires_grad_(refine)
    objective = None
    if refine:
        centres = [probe.centroids for probe in starts]
        objective = group.parallel(ModularityObjective(centres, config.modularity_temperature), device)
    linear_probe = group.parallel(heads.linear_probe, device) if context.has_labels else heads.linear_probe
    teacher = group.parallel(heads.teacher, device) if reference else heads.teacher
    epochs = context.epochs(config.epochs_cluster_probe)
    optimiser = torch.optim.Adam(probes.parameters(), lr=config.learning_rate)
    epoch_losses = torch.zeros(len(probes))
    epoch_batches = [0]
    head_optimiser = torch.optim.Adam(
        head_trained, lr=config.learning_rate, weight_decay=config.weight_decay if reference else 0.0
    )
    schedulers = [torch.optim.lr_scheduler.StepLR(optimiser, step_size=2, gamma=0.5)] if refine else []
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
        loss = features.new_zeros(())
        if objective is not None:
            (sampled,) = context.grid_sample(features)
            losses = objective(probe_space(sampled)) * context.batch_share()
            # Every process keeps the same start: the one best on the global batches.
            epoch_losses.add_(group.all_sum(losses.detach().clone()).cpu() / group.world_size)
            epoch_batches[0] += 1
            loss = losses.sum()
        probe_loss = None
        if context.has_labels:
            # In the reference recipe the cross-entropy reaches the teacher: one backward for
            # both losses, the head's gradient clipped.
            probe_loss = linear_probe_loss(context, linear_probe, features, labels, detach=not reference)
        optimiser.zero_grad(set_to_none=True)
        head_optimiser.zero_grad(set_to_none=True)
        total = loss + probe_loss if probe_loss is not None else loss
        if not total.requires_grad:  # fixed centroids and no labelled pixel: nothing learns
            context.checkpoint("cluster_probe", snapshot)
            continue
        scaler.scale(total).backward()
        if reference:
            scaler.unscale_(head_optimiser)
            torch.nn.utils.clip_grad_norm_(head_trained, config.grad_clip)
        if objective is not None:  # a scaler refuses to step an optimiser whose tensors got no gradient
            scaler.step(optimiser)
        if probe_loss is not None:
            scaler.step(head_optimiser)
        scaler.update()
        context.record_history("cluster_probe", {"loss": loss, "probe_loss": probe_loss}, optimiser)
        context.checkpoint("cluster_probe", snapshot)
    means = epoch_losses / max(1, epoch_batches[0])
    best = int(means.argmin())
    if objective is not None:
        listed = ", ".join(f"{value:.5f}" for value in means.tolist())
        context.run.log(f"cluster probe: last-epoch modularity loss {listed}; kept start {best + 1} of {len(probes)}")
    if reference:
        save_heads(context.run, heads)
    save_probe(context.run, starts[best], heads.linear_probe, config.probe_init, config.probe_space)


# How much of the training data the k-means start reads: enough tokens for a stable fit of a
# few dozen centroids in the head's 90 dimensions, and a bounded pass on a large dataset.
KMEANS_POINTS = 100_000
KMEANS_IMAGES = 2_000


@torch.no_grad()
def sample_teacher_features(context: TrainingContext, heads: SegmentationHeads, title: str) -> torch.Tensor:
    """The teacher's features ``[N, r]`` (as inference computes them: no dropout) of a sample
    of the training tokens; identical in every process."""
    config = context.config
    group = context.group
    resolution = config.front_door_resolution or config.resolution
    assert resolution is not None
    tokens = (resolution // context.backbone.patch_size) ** 2
    images = min(len(context.data_at(config.front_door_resolution)), KMEANS_IMAGES)
    per_image = tokens_per_image(KMEANS_POINTS, images, tokens)
    chooser = torch.Generator().manual_seed(config.seed)
    was_training = heads.training
    heads.eval()
    context.start = (0, 0)
    samples: list[torch.Tensor] = []
    seen = 0
    batches = context.training_batches(1, f"{title}: sampling features", resolution=config.front_door_resolution)
    for batch_tokens, _ in batches:
        with autocast(context.device):
            features = heads.teacher(batch_tokens).float()
        # One draw for the global batch, so every process picks what one process would.
        order = draw_tokens(sum(context.sizes), features.shape[1], per_image, chooser)
        picked = gather_tokens(features, order[context.first_image : context.first_image + features.shape[0]])
        samples.append(group.gather_rows(picked, context.sizes).flatten(0, 1).cpu())
        seen += sum(context.sizes)
        if seen >= images:
            break
    batches.close()  # now, while the process group still stands, not whenever it is collected
    heads.train(was_training)
    context.run.log(f"cluster probe: sampled {sum(len(rows) for rows in samples):,} tokens of {seen:,} images")
    return torch.cat(samples)
