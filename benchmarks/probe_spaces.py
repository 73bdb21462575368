"""Where should step three cluster? Offline variants of the cluster probe's space on trained runs.

For each run folder given (trained by ``benchmarks/quality.py``, whose ``--out`` holds the runs
and the backbone cache), it reads the backbone's tokens and the teacher head's features of up
to 256 training images (every token, no labels) and of up to 64 validation images, fits
spherical k-means (8 restarts, k-means++ seeding) in each candidate space on the training
features, and prints the validation mIoU (Hungarian matching, no CRF) of each:

- ``tokens``: the backbone's tokens (the baseline);
- ``head``: the head's features (the paper's space);
- ``whitened head``: the head's features whitened (the default, floor 1e-3; and floor 0.1);
- ``whitened tokens kN``: the tokens' N leading principal directions, whitened;
- ``whitened head + tokens kN wW``: the whitened head beside those directions at weight W.

With ``--fit-seeds S`` it also fits the default space again with S generator seeds, at 8
and 32 restarts, and prints each fit's mean cosine (the criterion restarts are ranked by)
beside its mIoU: how much one run's result moves with the fit alone. With ``--consensus N``
it makes three sets of N single-start fits in the default space and compares label-free ways
to make one partition of a set: the best mean cosine (the toolkit's), the fit that agrees most
with the others (the medoid; agreement is the share of training tokens two fits put together
after matching their clusters), and a consensus of all of them (k-means of the tokens'
concatenated one-hot assignments).

    CAUSE_HOME=/tmp/cause-quality/cache python benchmarks/probe_spaces.py \\
        /tmp/cause-quality/runs/vit-tiny-tune-overlap-100/default --fit-seeds 5

Validation maps are taken at the label's size from the token grid's scores, upsampled
bilinearly, for every space alike (the pipeline upsamples the head's features first; the
two orders differ at region borders only).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cause_cli.data import open_dataset
from cause_cli.data.loading import LoadReport, iterate_batches
from cause_cli.data.transforms import normalise_pixels
from cause_cli.inference.metrics import confusion_histogram, scores_from_histogram
from cause_cli.inference.predict import TrainedModel, backbone_and_head, load_trained
from cause_cli.model.kmeans import consensus_of, partition_agreement, spherical_kmeans
from cause_cli.model.ops import map_to_tokens
from cause_cli.model.whitening import FeatureWhitening
from cause_cli.runs import open_run

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # tokens, head features, labels


def read_split(model: TrainedModel, split: str, limit: int, crops: bool) -> Split:
    """Tokens ``[N, P, D]``, head features ``[N, P, r]`` and labels of up to ``limit`` images."""
    config = model.config
    data = open_dataset(config.dataset, config.data_dir, split, model.resolution, config.val_fraction, crops=crops)
    chosen = np.unique(np.linspace(0, len(data) - 1, min(len(data), limit)).round().astype(np.int64)).tolist()
    batches = [chosen[start : start + 16] for start in range(0, len(chosen), 16)]
    tokens, heads, labels = [], [], []
    for batch in iterate_batches(data, 16, LoadReport(), batches=batches, workers=0):  # type: ignore[arg-type]
        backbone_tokens, head_map = backbone_and_head(model, normalise_pixels(batch["image"], model.device))
        tokens.append(backbone_tokens)
        heads.append(map_to_tokens(head_map))
        if "label" in batch:
            labels.append(batch["label"])
    return torch.cat(tokens), torch.cat(heads), torch.cat(labels) if labels else None


def validation_miou(scores: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """mIoU of token-grid scores ``[B, P, C]`` upsampled to the labels' size."""
    batch, tokens, _ = scores.shape
    side = round(tokens**0.5)
    grid = scores.transpose(1, 2).reshape(batch, classes, side, side)
    predicted = F.interpolate(grid, size=labels.shape[-2:], mode="bilinear", align_corners=False).argmax(dim=1)
    return scores_from_histogram(confusion_histogram(predicted, labels, classes)).miou


def leading_directions(tokens: torch.Tensor, count: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Unit tokens centred and projected on their ``count`` leading principal directions, whitened."""
    unit = F.normalize(tokens, dim=-1)
    mean = unit.mean(dim=0)
    variances, directions = torch.linalg.eigh(torch.cov((unit - mean).T.double()))
    order = variances.argsort(descending=True)[:count]
    projection = (directions[:, order] / variances[order].clamp_min(1e-12).sqrt()).float()
    return lambda x: (F.normalize(x, dim=-1) - mean) @ projection


def study(run: str, fit_seeds: int, consensus: int) -> dict[str, object]:
    """Every candidate space's validation mIoU on one trained run."""
    model = load_trained(open_run(run), torch.device("cpu"))
    classes = model.num_classes
    train_tokens, train_heads, _ = read_split(model, "train", 256, crops=True)
    val_tokens, val_heads, val_labels = read_split(model, "val", 64, crops=False)
    assert val_labels is not None, f"{run}: the validation split has no labels"
    tokens, heads = train_tokens.flatten(0, 1), train_heads.flatten(0, 1)
    results: dict[str, object] = {"run": run}

    def score(fit_on: torch.Tensor, assign: torch.Tensor, seed: int = 0, restarts: int = 8) -> tuple[float, float]:
        """Validation mIoU and mean cosine of a k-means fit on ``fit_on``, assigning ``assign``."""
        fitted = spherical_kmeans(fit_on, classes, torch.Generator().manual_seed(seed), restarts)
        miou = validation_miou(F.normalize(assign, dim=-1) @ fitted.centroids.T, val_labels, classes)
        return round(miou, 1), fitted.mean_cosine

    results["tokens"] = score(tokens, val_tokens)[0]
    results["head"] = score(heads, val_heads)[0]
    for floor in (1e-3, 1e-1):
        whitening = FeatureWhitening.fit(heads, floor=floor)
        results[f"whitened head floor {floor:g}"] = score(whitening(heads), whitening(val_heads))[0]
    whitening = FeatureWhitening.fit(heads)
    for count in (16, 32, 64):
        project = leading_directions(tokens, count)
        results[f"whitened tokens k{count}"] = score(project(tokens), project(val_tokens))[0]
    for count in (16, 32):
        project = leading_directions(tokens, count)
        for weight in (0.5, 1.0):
            results[f"whitened head + tokens k{count} w{weight:g}"] = score(
                torch.cat([whitening(heads), weight * project(tokens)], dim=-1),
                torch.cat([whitening(val_heads), weight * project(val_tokens)], dim=-1),
            )[0]
    for restarts in (8, 32) if fit_seeds else ():
        fits = []
        for seed in range(fit_seeds):
            miou, mean_cosine = score(whitening(heads), whitening(val_heads), seed, restarts)
            fits.append({"seed": seed, "mean_cosine": round(mean_cosine, 4), "miou": miou})
        results[f"whitened head, {restarts} restarts, by fit seed"] = fits
    if consensus:
        results[f"whitened head, {consensus} single-start fits"] = consensus_study(
            whitening(heads), whitening(val_heads), val_labels, classes, consensus
        )
    return results


def consensus_study(
    points: torch.Tensor, validation: torch.Tensor, labels: torch.Tensor, classes: int, fits: int, sets: int = 3
) -> dict[str, object]:
    """Three ways to make one partition of ``fits`` single-start fits, each way's mIoU for
    ``sets`` sets of fits (other generator seeds): the fit of best mean cosine, the medoid fit,
    and the consensus (spherical k-means of every point's concatenated one-hot assignments, so
    points go together when most fits put them together; its centroids are then the means of
    the points in each consensus cluster)."""
    unit = F.normalize(points, dim=-1)
    assign_validation = F.normalize(validation, dim=-1)
    results: dict[str, list[float]] = {"best mean cosine": [], "medoid": [], "consensus": [], "single fits": []}
    for first_seed in range(0, fits * sets, fits):
        found = []
        for seed in range(first_seed, first_seed + fits):
            fitted = spherical_kmeans(points, classes, torch.Generator().manual_seed(seed), 1)
            partition = (unit @ fitted.centroids.T).argmax(dim=-1)
            miou = validation_miou(assign_validation @ fitted.centroids.T, labels, classes)
            found.append((fitted.mean_cosine, round(miou, 1), partition))
        agreement = np.ones((fits, fits))
        for i in range(fits):
            for j in range(i + 1, fits):
                agreement[i, j] = agreement[j, i] = partition_agreement(found[i][2], found[j][2], classes)
        results["medoid"].append(found[int(agreement.mean(axis=1).argmax())][1])
        results["best mean cosine"].append(found[int(np.argmax([cosine for cosine, _, _ in found]))][1])
        results["single fits"] += [miou for _, miou, _ in found]
        partitions = [partition for _, _, partition in found]
        consensus = consensus_of(unit, partitions, classes, torch.Generator().manual_seed(first_seed))
        miou = validation_miou(assign_validation @ consensus.centroids.T, labels, classes)
        results["consensus"].append(round(miou, 1))
    singles = results.pop("single fits")
    return {**results, "single fits, lowest / highest": [min(singles), max(singles)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="trained run folders")
    parser.add_argument("--fit-seeds", type=int, default=0, help="refit the default space with this many seeds")
    parser.add_argument("--consensus", type=int, default=0, help="single-start fits to pick one of, two ways")
    options = parser.parse_args()
    torch.set_grad_enabled(False)
    for run in options.runs:
        print(json.dumps(study(run, options.fit_seeds, options.consensus)), flush=True)


if __name__ == "__main__":
    main()
