"""Time and peak memory of the training steps, this toolkit's forms against straightforward
forms written the way the reference computes them, on the same inputs in the same process.

    python benchmarks/bench_steps.py              # shapes scaled to a 2-core CPU
    python benchmarks/bench_steps.py --device cuda --full   # the paper's shapes on a GPU

Cases, one line each with the ratio (reference form / this toolkit's):
  clusterbook  one step of the modularity objective, K = 2048, B = 16, P = 100 tokens:
               the direct [B, K, P, P] form against the chunked one (time and peak memory);
  front-door   one step of step two with every code of a K = 2048 bank at its 100 entries:
               dict-of-tensors bank rebuilt by concatenation and a loop over images against
               the ring buffer and the vectorised loss (time);
  segment      a batch of images to cluster maps without and with the dense CRF (ViT-S/8,
               random weights): the reference's two passes (three backbone runs per image,
               an einsum over upsampled features, the CRF by Pool.map) against the toolkit's
               one pass (two backbone runs, the CRF in its worker pool) (time);
and checks that both forms give the same loss (and gradient) before timing them.

Peak memory on the CPU is how far the process's resident high-water mark (Linux VmHWM, reset
before each form through /proc/self/clear_refs) rises while one form runs; on CUDA it is
torch's peak allocation.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cause_cli.backbones import REGISTRY, FrozenBackbone, build_model
from cause_cli.config import TrainConfig
from cause_cli.data.transforms import denormalise_to_uint8
from cause_cli.devices import use_precision
from cause_cli.inference.crf import CRFPool, crf_available, dense_crf
from cause_cli.inference.predict import TrainedModel, predict_batch
from cause_cli.model.bank import ConceptBank
from cause_cli.model.contrastive import ContrastiveSettings, concept_contrastive_terms
from cause_cli.model.heads import ClusterProbe, SegmentationHeads
from cause_cli.model.modularity import modularity_loss
from cause_cli.model.ops import map_to_tokens, tokens_to_map
from cause_cli.model.slow import LoopBank, entrywise_contrastive_loss, loop_contrastive_loss


def timed(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    step()  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


# --- clusterbook -------------------------------------------------------------------------


def clusterbook_inputs(device: torch.device, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(16, 100, dim, generator=generator).to(device)
    clusterbook = (torch.rand(2048, dim, generator=generator) * 2 - 1).div(2048).to(device).requires_grad_(True)
    return tokens, clusterbook


def clusterbook_step(tokens: torch.Tensor, clusterbook: torch.Tensor, chunk: int | None) -> tuple[float, torch.Tensor]:
    clusterbook.grad = None
    loss = modularity_loss(clusterbook, tokens, chunk_size=chunk)
    loss.backward()
    assert clusterbook.grad is not None
    return loss.item(), clusterbook.grad.clone()


def _resident_peak() -> int:
    """The process's resident-memory high-water mark (VmHWM), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_resident_peak() -> None:
    # Writing 5 to clear_refs resets the high-water mark to the current resident size.
    Path("/proc/self/clear_refs").write_text("5")


def cpu_peak_growth(step: Callable[[], object]) -> int:
    """How far the resident high-water mark rises above the current size while ``step`` runs."""
    _reset_resident_peak()
    base = _resident_peak()
    step()
    return _resident_peak() - base


def bench_clusterbook(device: torch.device, dim: int, repeats: int) -> None:
    tokens, clusterbook = clusterbook_inputs(device, dim)
    direct_loss, direct_grad = clusterbook_step(tokens, clusterbook, None)
    chunked_loss, chunked_grad = clusterbook_step(tokens, clusterbook, 64)
    assert abs(direct_loss - chunked_loss) <= 1e-5 * abs(direct_loss), (direct_loss, chunked_loss)
    torch.testing.assert_close(chunked_grad, direct_grad, rtol=1e-4, atol=1e-8)
    direct_time = timed(lambda: clusterbook_step(tokens, clusterbook, None), device, repeats)
    chunked_time = timed(lambda: clusterbook_step(tokens, clusterbook, 64), device, repeats)
    if device.type == "cuda":
        peaks = []
        for chunk in (None, 64):
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            clusterbook_step(tokens, clusterbook, chunk)
            peaks.append(torch.cuda.max_memory_allocated() - base)
        direct_peak, chunked_peak = peaks
    else:
        chunked_peak = cpu_peak_growth(lambda: clusterbook_step(tokens, clusterbook, 64))
        direct_peak = cpu_peak_growth(lambda: clusterbook_step(tokens, clusterbook, None))
    print(
        f"clusterbook  K=2048 B=16 P=100 D={dim}: time direct {direct_time * 1e3:.0f} ms, chunked "
        f"{chunked_time * 1e3:.0f} ms (speed-up x{direct_time / chunked_time:.2f}); peak memory direct "
        f"{direct_peak / 2**20:.0f} MiB, chunked {chunked_peak / 2**20:.0f} MiB "
        f"(chunked uses 1/{direct_peak / max(chunked_peak, 1):.1f}); loss equal: {chunked_loss:.6f}"
    )


# --- front door ----------------------------------------------------------------------------


def bench_front_door(
    device: torch.device, dim: int, projection: int, batch: int, tokens: int, repeats: int, forms: tuple[str, ...]
) -> None:
    """One front-door step against a full bank in each form of ``forms``: ``by-code`` (this
    toolkit's: masks through the [rows, K] code table, one kept [rows, entries] tensor),
    ``entrywise`` (its form before: [rows, entries] masks and similarities through autograd)
    and ``loop`` (the reference's: dict-of-tensors bank, a loop over images)."""
    codes_total, capacity = 2048, 100
    generator = torch.Generator().manual_seed(1)
    clusterbook = torch.randn(codes_total, dim, generator=generator).to(device)
    normalised = F.normalize(clusterbook, dim=1)
    ring = ConceptBank(codes_total, projection, capacity, device)
    loop = LoopBank(codes_total, capacity) if "loop" in forms else None
    fill_codes = torch.arange(codes_total, device=device).repeat_interleave(capacity)
    for half in range(2):  # each code gets 2 x capacity tokens once: half of them fill it
        fill = torch.randn(codes_total * capacity, projection, generator=generator).to(device)
        keys = torch.rand(fill_codes.numel(), generator=generator).to(device) + half
        ring.update(torch.cat([fill_codes, fill_codes]), torch.cat([fill, fill]), torch.cat([keys, keys]))
        if loop is not None:
            loop.update(torch.cat([fill_codes, fill_codes]), torch.cat([fill, fill]), torch.cat([keys, keys]))
        del fill
    assert int(ring.filled.min()) == capacity

    features = torch.randn(batch, tokens, dim, generator=generator).to(device)
    torch.manual_seed(2)
    heads = SegmentationHeads(dim, 90, projection, 27, dropout=0.0).to(device).train()
    optimiser = torch.optim.Adam(heads.student_parameters(), lr=1e-3)
    branch = heads.student_branch()
    settings = ContrastiveSettings()

    def step(form: str) -> float:
        codes = (F.normalize(features, dim=-1) @ normalised.t()).argmax(dim=-1)
        with torch.no_grad():
            teacher = heads.teacher_projection(heads.teacher(features))
        if form == "by-code":  # as step two computes it
            by_code = ring.by_code(normalised)
            candidates = [F.normalize(teacher.flatten(0, 1), dim=-1), by_code.features.flatten(0, 1)]
            student, inputs, through = branch(features, candidates)
            assert through is not None
            by_code = by_code.through(through[1])
            values, defined = concept_contrastive_terms(
                student, normalised[codes], teacher, normalised[codes], 0, by_code, settings, inputs, through[0]
            )
            loss = values[defined].mean()
        elif form == "entrywise":
            student, _, _ = branch(features)
            bank_features, bank_codes = ring.entries()
            loss = entrywise_contrastive_loss(
                student, teacher, normalised[codes], bank_features, normalised[bank_codes], settings
            )
        else:
            assert loop is not None
            student, _, _ = branch(features)
            bank_features, bank_vectors = loop.flat(clusterbook)
            loss = loop_contrastive_loss(student, teacher, normalised[codes], bank_features, bank_vectors, settings)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        heads.update_teacher(0.99)
        # The same keys for every form, so that the banks stay equal (and full).
        update_keys = torch.rand(codes.numel(), generator=torch.Generator().manual_seed(3)).to(device)
        if form == "loop":
            assert loop is not None
            loop.update(codes, teacher, update_keys)
        else:
            ring.update(codes, teacher, update_keys)
        return loss.item()

    state = {k: v.clone() for k, v in heads.state_dict().items()}
    ring_state = {k: v.clone() for k, v in ring.state_dict().items()}

    def reset() -> None:
        heads.load_state_dict(state)
        ring.load_state_dict({k: v.clone() for k, v in ring_state.items()})

    losses: dict[str, float] = {}
    seconds: dict[str, float] = {}
    peaks: dict[str, int] = {}
    for form in forms:
        reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            losses[form] = step(form)
            peaks[form] = torch.cuda.max_memory_allocated() - base
        else:
            peaks[form] = cpu_peak_growth(lambda form=form: losses.__setitem__(form, step(form)))
        seconds[form] = timed(lambda form=form: step(form), device, repeats)
    first = forms[0]
    for form in forms[1:]:
        assert abs(losses[form] - losses[first]) <= 1e-5 * abs(losses[first]), (losses[form], losses[first])
    print(
        f"front-door   K=2048 full bank ({codes_total * capacity} entries) B={batch} P={tokens} D={dim} "
        f"E={projection}: "
        + ", ".join(f"{form} {seconds[form] * 1e3:.0f} ms (peak {peaks[form] / 2**20:.0f} MiB)" for form in forms)
        + "; "
        + ", ".join(f"{form} / {first} x{seconds[form] / seconds[first]:.2f}" for form in forms[1:])
        + f"; same loss: {', '.join(f'{losses[form]:.6f}' for form in forms)}"
    )


# --- segmenting images ---------------------------------------------------------------------


def segmenting_model(device: torch.device, resolution: int, classes: int = 27) -> TrainedModel:
    """A randomly initialised ViT-S/8 with random heads and centroids, as a trained run loads."""
    spec = REGISTRY["dino-vits8"]
    torch.manual_seed(4)
    backbone = FrozenBackbone(spec, build_model(spec)).to(device)
    heads = SegmentationHeads(spec.dim, 90, 2048, classes).to(device).eval()
    cluster_probe = ClusterProbe(90, classes).to(device)
    config = TrainConfig(data_dir="", backbone=spec.name, resolution=resolution)
    return TrainedModel(config, backbone, heads, cluster_probe, heads.linear_probe, classes, None, device)


def reference_way_of_segmenting(
    model: TrainedModel, images: torch.Tensor, size: tuple[int, int], pool: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster maps without and with the dense CRF the way the reference's test script gets
    them: a pass for each (the image alone, then image and flip through the backbone again),
    cosines by an einsum over the upsampled features, the CRF by a pool's map over the batch."""

    def cosines_at(features: torch.Tensor) -> torch.Tensor:
        upsampled = F.interpolate(tokens_to_map(features), size, mode="bilinear", align_corners=False)
        centroids = F.normalize(model.cluster_probe.centroids, dim=1)
        return torch.einsum("bchw,nc->bnhw", F.normalize(upsampled, dim=1), centroids)

    with torch.no_grad():
        plain = cosines_at(model.heads.teacher(model.backbone(images))).argmax(dim=1)
        own = tokens_to_map(model.heads.teacher(model.backbone(images)))
        flipped = tokens_to_map(model.heads.teacher(model.backbone(images.flip(dims=[3]))))
        averaged = map_to_tokens((own + flipped.flip(dims=[3])) / 2)
        unary = torch.log_softmax(3 * cosines_at(averaged), dim=1)
    marginals = pool.starmap(dense_crf, zip(denormalise_to_uint8(images), unary.cpu().numpy(), strict=True))
    return plain, torch.from_numpy(np.stack(marginals).argmax(axis=1))


def bench_segment(device: torch.device, batch: int, resolution: int, workers: int, repeats: int) -> None:
    if not crf_available():
        print("segment      skipped: the dense CRF (pydensecrf) is not installed")
        return
    model = segmenting_model(device, resolution)
    images = torch.randn(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(5)).to(device)
    size = (resolution, resolution)
    with CRFPool(workers) as crf_pool, multiprocessing.get_context("spawn").Pool(workers) as reference_pool:
        # Agreement in float32 (the reference's precision); the timings below use the default.
        with use_precision("float32"):
            ours = predict_batch(model, images, size, crf_pool)
            ours_refined = ours.refined()
            plain, refined = reference_way_of_segmenting(model, images, size, reference_pool)
        assert ours_refined is not None
        same_plain = (ours.clusters.cpu() == plain.cpu()).float().mean().item()
        same_refined = (ours_refined.cpu() == refined).float().mean().item()
        assert same_plain >= 0.9999 and same_refined >= 0.999, (same_plain, same_refined)
        our_time = timed(lambda: predict_batch(model, images, size, crf_pool).refined(), device, repeats)
        reference_time = timed(
            lambda: reference_way_of_segmenting(model, images, size, reference_pool), device, repeats
        )
    print(
        f"segment      ViT-S/8 B={batch} at {resolution}, with and without CRF ({workers} CRF processes): "
        f"reference way {reference_time:.2f} s, one pass {our_time:.2f} s (speed-up x{reference_time / our_time:.2f}); "
        f"same clusters at {100 * same_plain:.3f}% of pixels, after CRF {100 * same_refined:.3f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the paper's shapes (for a GPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument(
        "--front-door-paper-shapes",
        action="store_true",
        help="also time the by-code and entrywise forms at the paper's shapes (about 20 GB on a CPU)",
    )
    parser.add_argument("--crf-workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    device = torch.device(args.device)
    bench_clusterbook(device, args.dim, args.repeats)
    if args.full:
        bench_front_door(device, args.dim, 2048, 16, 100, args.repeats, ("by-code", "entrywise", "loop"))
    else:
        # The loop form rebuilds the whole bank (features and code vectors) by concatenation
        # every step, which costs time quadratic in the bank's size: small widths keep it to
        # seconds on a CPU.
        bench_front_door(device, 64, 32, 4, 16, args.repeats, ("by-code", "entrywise", "loop"))
    if args.front_door_paper_shapes:
        bench_front_door(device, args.dim, 2048, 16, 100, args.repeats, ("by-code", "entrywise"))
    if args.full:
        bench_segment(device, batch=16, resolution=320, workers=args.crf_workers, repeats=args.repeats)
    else:
        bench_segment(device, batch=4, resolution=224, workers=args.crf_workers, repeats=args.repeats)


if __name__ == "__main__":
    main()
