"""The planted bugs of the mutation sweep (``nox -s mutants``): each a small, plausible change to
one line of the package, with the tests that guard that area. A mutant is *caught* when those
tests fail with it; ``equivalent`` says why one cannot change any result, when that is so.

Add a mutant when you add a guarantee: the sweep keeps saying which of them the tests hold.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # below src/cause_cli
    find: str  # must occur exactly once
    replace: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    equivalent: str | None = None


MODULARITY = ("tests/test_modularity.py", "tests/test_parity_modularity.py")
KMEANS = ("tests/test_kmeans.py",)
WHITENING = ("tests/test_whitening.py",)
SPREAD = ("tests/test_spread.py",)
SEGMENT = ("tests/test_segment_writing.py", "tests/test_segment_memory.py")
CRF_TORCH = ("tests/test_crf_torch.py", "-k", "not agree_between and not without")
METRICS = ("tests/test_metrics.py",)
HISTORY = ("tests/test_history.py",)
PROBE = (
    "tests/test_probe_selection.py",
    "tests/test_whitening.py",
    "tests/test_trained.py",
    "tests/test_spread.py",
    "tests/test_recipe.py",
)
LABEL_FREE = ("tests/test_cli.py", "tests/test_recipe.py", "-k", "labels_influence or partly or labels_reach")
TRAINED = ("tests/test_trained.py", "tests/test_probe_selection.py", "tests/test_upsampling.py", "tests/test_import.py")
RESOLVE = ("tests/test_recipe.py", "tests/test_settings.py", "tests/test_defaults.py")

MUTANTS = (
    # model/modularity.py
    Mutant(
        "affinity not clamped at 0",
        "model/modularity.py",
        "affinity = (normed @ normed.transpose(1, 2)).clamp_min(0)",
        "affinity = normed @ normed.transpose(1, 2)",
        MODULARITY,
    ),
    Mutant(
        "self-loops kept",
        "model/modularity.py",
        "affinity = affinity * (1 - torch.eye(affinity.shape[-1], device=x.device, dtype=affinity.dtype))",
        "affinity = affinity",
        MODULARITY,
    ),
    Mutant(
        "temperature multiplies",
        "model/modularity.py",
        "return torch.tanh(products / temperature).max(dim=1).values",
        "return torch.tanh(products * temperature).max(dim=1).values",
        MODULARITY,
    ),
    Mutant(
        "co-membership averaged over codes",
        "model/modularity.py",
        "return torch.tanh(products / temperature).max(dim=1).values",
        "return torch.tanh(products / temperature).mean(dim=1)",
        MODULARITY,
    ),
    Mutant(
        "default temperature",
        "model/modularity.py",
        "DEFAULT_TEMPERATURE = 0.1",
        "DEFAULT_TEMPERATURE = 0.2",
        MODULARITY,
    ),
    # model/kmeans.py
    Mutant("consensus share", "model/kmeans.py", "CONSENSUS_SHARE = 0.5", "CONSENSUS_SHARE = 0.6", KMEANS),
    # model/whitening.py and heads.py (ranking)
    Mutant(
        "k-means++ picks the farthest-spread candidate",
        "model/kmeans.py",
        "        best = int(totals.argmin())\n        seeds.append(int(candidates[best]))",
        "        best = int(totals.argmax())\n        seeds.append(int(candidates[best]))",
        KMEANS,
    ),
    Mutant(
        "k-means keeps the worst restart",
        "model/kmeans.py",
        "if best is None or float(fit.mean()) > float(best[2].mean()):",
        "if best is None or float(fit.mean()) < float(best[2].mean()):",
        KMEANS,
    ),
    Mutant(
        "centroids not normalised",
        "model/kmeans.py",
        "    updated = F.normalize(sums, dim=1)",
        "    updated = sums / counts.clamp_min(1)[:, None]",
        KMEANS,
    ),
    Mutant(
        "zero rows kept",
        "model/kmeans.py",
        "return F.normalize(features.float(), dim=1)[features.float().norm(dim=1) > 0]",
        "return F.normalize(features.float(), dim=1)",
        KMEANS,
    ),
    Mutant("whitening floor", "model/whitening.py", "WHITENING_FLOOR = 1e-3", "WHITENING_FLOOR = 1e-4", WHITENING),
    Mutant(
        "ranking without the mean",
        "model/heads.py",
        "return F.normalize(tokens, dim=-1) @ folded - self.whitening.mean @ folded",
        "return F.normalize(tokens, dim=-1) @ folded",
        WHITENING,
    ),
    Mutant(
        "best channel reversed ties",
        "model/ops.py",
        "return scores.max(dim=1).indices",
        "return scores.flip(1).max(dim=1).indices.neg().add(scores.shape[1] - 1)",
        ("tests/test_segment_writing.py", "-k", "best_channel"),
    ),
    # model/spread.py
    Mutant(
        "spread ranking without the means' term",
        "model/spread.py",
        "return unit @ weighted.T - 0.5 * (means * weighted).sum(-1)",
        "return unit @ weighted.T",
        SPREAD,
    ),
    Mutant(
        "spread without shrinkage",
        "model/spread.py",
        "variance = ((1 - shrinkage) * variance + shrinkage * variance.mean()).clamp_min(1e-12)",
        "variance = variance.clamp_min(1e-12)",
        SPREAD,
    ),
    # inference/metrics.py
    Mutant(
        "accuracy over predictions",
        "inference/metrics.py",
        "accuracy = true_positive.sum() / matched.sum()",
        "accuracy = true_positive.sum() / predicted.max() / len(predicted)",
        METRICS,
    ),
    Mutant(
        "IoU without the overlap",
        "inference/metrics.py",
        "iou = true_positive / (predicted + actual - true_positive)",
        "iou = true_positive / (predicted + actual)",
        METRICS,
    ),
    # inference/ (segment's outputs, the writer, the CRF, export's gate)
    Mutant(
        "writer commits newest first",
        "inference/writing.py",
        "group = self._groups.popleft()",
        "group = self._groups.pop()",
        SEGMENT,
    ),
    Mutant(
        "failed group's files kept",
        "inference/writing.py",
        "        except BaseException:\n            _discard(group)\n            raise",
        "        except BaseException:\n            raise",
        SEGMENT,
    ),
    Mutant(
        "classes not matched",
        "inference/segmenter.py",
        "clusters = self.mapping_on_device.to(clusters.device)[clusters.long()]",
        "pass",
        SEGMENT,
    ),
    Mutant(
        "overlay colours reversed",
        "inference/segmenter.py",
        "overlay = overlay_image(image, label, self.colours, in_place=True)",
        "overlay = overlay_image(image, label, self.colours[::-1], in_place=True)",
        SEGMENT,
    ),
    Mutant("overlay opacity", "inference/outputs.py", "OVERLAY_OPACITY = 0.5", "OVERLAY_OPACITY = 0.6", SEGMENT),
    Mutant(
        "model input resized bilinearly",
        "inference/inputs.py",
        "model_input = np.asarray(resize_and_crop(image, self.resolution, square_resize=True))",
        "model_input = np.asarray(image.resize((self.resolution, self.resolution)))",
        SEGMENT,
    ),
    Mutant(
        "page legend reversed",
        "inference/report.py",
        "    colours = palette()",
        "    colours = palette()[::-1]",
        SEGMENT,
    ),
    Mutant(
        "export gate loosened",
        "inference/export.py",
        "if agreement < 0.999:",
        "if agreement < 0.98:",
        ("tests/test_export.py",),
    ),
    Mutant(
        "CRF image in RGB order",
        "inference/crf_torch.py",
        "bgr = image.reshape(-1, 3).flip(1).float()",
        "bgr = image.reshape(-1, 3).float()",
        CRF_TORCH,
    ),
    Mutant(
        "CRF unary floor",
        "inference/crf_torch.py",
        "unary = -torch.log(probabilities.clamp(UNARY_CLIP, 1.0))",
        "unary = -torch.log(probabilities.clamp(1e-3, 1.0))",
        CRF_TORCH,
    ),
    Mutant(
        "CRF kernel weight",
        "inference/crf_torch.py",
        "            energy = energy + kernel.message(marginals)",
        "            energy = energy + 0.9 * kernel.message(marginals)",
        CRF_TORCH,
    ),
    Mutant(
        "lattice blur weight",
        "inference/lattice.py",
        "table = blur @ table",
        "table = 0.5 * (blur @ table + table)",
        CRF_TORCH,
    ),
    Mutant(
        "lattice rounding",
        "inference/lattice.py",
        "    nearest = torch.round(elevated * down)  # ties to even, as SSE rounds",
        "    nearest = torch.floor(elevated * down + 0.5)",
        CRF_TORCH,
        equivalent="rounds half up instead of to even: the two differ only on exact ties, which real "
        "features hit with probability zero",
    ),
    # training/history.py
    Mutant(
        "history not cut on restart",
        "training/history.py",
        'and (STEPS.index(row["step"]) < order or (row["step"] == step and int(row["update"]) <= done))',
        "",
        HISTORY,
    ),
    Mutant(
        "history without the last row",
        "training/history.py",
        "return update == updates or update % history_stride(updates) == 0",
        "return update % history_stride(updates) == 0",
        HISTORY,
    ),
    # sharing.py
    Mutant(
        "pushed pictures without the curves",
        "sharing.py",
        'PICTURES = ("confusion.png", "samples.png", "curves.png")',
        'PICTURES = ("confusion.png", "samples.png")',
        ("tests/test_push.py",),
    ),
    Mutant(
        "push ignores --private",
        "sharing.py",
        'api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")',
        'api.create_repo(repo_id, private=False, exist_ok=True, repo_type="model")',
        ("tests/test_push.py",),
    ),
    Mutant(
        "non-commercial licence not flagged",
        "sharing.py",
        'return "NC" in licence.upper().split("-") or "gated" in licence.lower()',
        'return "gated" in licence.lower()',
        ("tests/test_push.py",),
    ),
    Mutant(
        "card figures in another unit",
        "sharing.py",
        'return "-" if value is None else f"{float(value):.1f}"',
        'return "-" if value is None else f"{float(value) / 100:.3f}"',
        ("tests/test_push.py",),
    ),
    # training/cluster_probe.py
    Mutant(
        "worst start kept",
        "training/cluster_probe.py",
        "best = int(means.argmin())",
        "best = int(means.argmax())",
        PROBE,
    ),
    Mutant(
        "features sampled with dropout",
        "training/cluster_probe.py",
        "    heads.eval()\n    context.start = (0, 0)",
        "    context.start = (0, 0)",
        PROBE,
    ),
    Mutant(
        "k-means in the unwhitened space",
        "training/cluster_probe.py",
        "        points = whitening(points)",
        "        points = points",
        PROBE,
    ),
    Mutant(
        "labels reach the teacher",
        "training/cluster_probe.py",
        "detach=not reference)",
        "detach=reference)",
        LABEL_FREE,
    ),
    Mutant(
        "refinement's learning rate decays every epoch",
        "training/cluster_probe.py",
        "StepLR(optimiser, step_size=2, gamma=0.5)] if refine",
        "StepLR(optimiser, step_size=1, gamma=0.5)] if refine",
        ("tests/test_probe_selection.py", "tests/test_reference_pipeline.py", "tests/test_resume.py"),
    ),
    # training/probe_kinds.py
    Mutant(
        "spread kept on a refined probe",
        "training/probe_kinds.py",
        "spread = not config.refines_probe and uses_spread(config.probe_spread, result.agreement)",
        "spread = uses_spread(config.probe_spread, result.agreement)",
        PROBE,
    ),
    Mutant(
        "consensus never used",
        "training/probe_kinds.py",
        "    if config.probe_consensus:\n",
        "    if False:\n",
        PROBE,
    ),
    Mutant(
        "random restarts ignored",
        "training/probe_kinds.py",
        "for _ in range(config.probe_restarts)",
        "for _ in range(1)",
        PROBE,
    ),
    Mutant(
        "k-means start ignores the seed",
        "training/probe_kinds.py",
        "    generator = torch.Generator().manual_seed(config.seed)",
        "    generator = torch.Generator().manual_seed(0)",
        PROBE,
    ),
    Mutant(
        "spread's means dropped",
        "training/probe_kinds.py",
        "probe.centroids.data.copy_(fitted.means)",
        "probe.centroids.data.copy_(result.centroids)",
        PROBE,
    ),
    # trained.py (the run's weights)
    Mutant(
        "spread not recorded",
        "trained.py",
        '"spread": probe.precision is not None,',
        '"spread": False,',
        TRAINED,
    ),
    Mutant(
        "linear probe not loaded",
        "trained.py",
        "    if parts.linear_probe:\n        linear_probe.load_state_dict(",
        "    if False:\n        linear_probe.load_state_dict(",
        TRAINED,
    ),
    Mutant(
        "probe format not checked",
        "trained.py",
        "if written != (PROBE_FORMAT, PROBE_FORMAT_VERSION):",
        "if False:",
        TRAINED,
    ),
    Mutant(
        "scores always upsampled",
        "trained.py",
        'upsample_scores = config.probe_upsampling == "scores"',
        "upsample_scores = True",
        TRAINED,
    ),
    # resolve.py and the command line (settings)
    Mutant(
        "folders get the paper's thresholds",
        "resolve.py",
        'positive, negative = PAPER_THRESHOLDS if paper_dataset or config.recipe == "reference" else FOLDER_THRESHOLDS',
        "positive, negative = PAPER_THRESHOLDS",
        RESOLVE,
    ),
    Mutant(
        "minimum updates ignored",
        "resolve.py",
        "epochs = max(config.paper_epochs(step), needed)",
        "epochs = config.paper_epochs(step)",
        RESOLVE,
    ),
    Mutant(
        "reference recipe trains whole epochs",
        "resolve.py",
        "epoch_fraction=1.0 / gpus,",
        "epoch_fraction=1.0,",
        RESOLVE,
    ),
    Mutant(
        "a settings file overrides the command line",
        "cli/train.py",
        "config = TrainConfig(**{**from_file, **given})",
        "config = TrainConfig(**{**given, **from_file})",
        ("tests/test_settings.py",),
    ),
)
