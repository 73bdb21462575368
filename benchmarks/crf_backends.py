"""The dense CRF's two backends side by side: images/s of the torch backend and of pydensecrf,
and how many pixels their label maps share, on the shared real photos.

    python benchmarks/crf_backends.py                  # this machine's CPUs for both
    python benchmarks/crf_backends.py --device cuda    # torch on the GPU, pydensecrf on every CPU

The photos (ten Pascal VOC photos and a Cityscapes frame from ``../shared/data/real``) are
resized to ``--size`` squared, the evaluation's label size, and given 27-class unaries as the
paper's COCO-Stuff-27 runs have them: ``log_softmax(3 cos)`` of smooth random scores. pydensecrf
refines them in ``--processes`` worker processes (default: one per CPU), the torch backend in
batches of ``--batch-size`` with torch's threads capped at the same number on the CPU, or on the
GPU. Each is timed after a warm-up (pool started, lattice code run once); rounds alternate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cause_cli.devices import available_cpus
from cause_cli.inference.crf import CRFPool, TorchCRF, crf_available

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


def photos_and_unaries(size: int, copies: int, classes: int = 27) -> tuple[list[np.ndarray], list[np.ndarray]]:
    paths = sorted(REAL.glob("voc2012/images/*.png")) + sorted(REAL.glob("cityscapes/leftImg8bit/**/*.png"))
    if not paths:
        raise SystemExit(f"no photographs in {REAL}: the benchmark needs ../shared beside the repository")
    generator = torch.Generator().manual_seed(0)
    images, unaries = [], []
    for _ in range(copies):
        for path in paths:
            image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            coarse = torch.randn(1, classes, 8, 8, generator=generator)
            cosines = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0].tanh()
            images.append(np.asarray(image))
            unaries.append(torch.log_softmax(3 * cosines, dim=0).numpy())
    return images, unaries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--copies", type=int, default=2, help="times the 11 photos are refined per round")
    parser.add_argument("--processes", type=int, default=None, help="default: one per CPU")
    parser.add_argument("--batch-size", type=int, default=8, help="images per lattice, torch backend")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args()
    processes = options.processes or available_cpus()
    device = torch.device(options.device)
    if device.type == "cpu":
        torch.set_num_threads(processes)
    images, unaries = photos_and_unaries(options.size, options.copies)
    count = len(images)
    refiner = TorchCRF(device)
    refiner.run(images[:1], unaries[:1])  # warm-up
    pool = CRFPool(processes) if crf_available() else None
    if pool is not None:
        pool.start()
    where = f"{processes} threads" if device.type == "cpu" else "the GPU"
    print(f"{count} photos at {options.size} x {options.size}, 27 classes; pydensecrf in {processes} processes, "
          f"torch on {device} ({where})")  # fmt: skip
    try:
        for round_index in range(options.rounds):
            started = time.perf_counter()
            mine: list[np.ndarray] = []
            for start in range(0, count, options.batch_size):
                chunk = slice(start, start + options.batch_size)
                maps = refiner.run(images[chunk], unaries[chunk])
                mine.extend(labels.cpu().numpy() for labels in maps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            torch_rate = count / (time.perf_counter() - started)
            line = f"round {round_index + 1}: torch {torch_rate:.2f} images/s"
            if pool is not None:
                started = time.perf_counter()
                theirs = pool.run(images, unaries)
                pydensecrf_rate = count / (time.perf_counter() - started)
                same = sum(int((a == b).sum()) for a, b in zip(mine, theirs, strict=True))
                total = sum(b.size for b in theirs)
                line += (f", pydensecrf {pydensecrf_rate:.2f} images/s, torch / pydensecrf "
                         f"{torch_rate / pydensecrf_rate:.2f}; label maps agree on "
                         f"{same / total:.4%} of pixels")  # fmt: skip
            print(line)
    finally:
        if pool is not None:
            pool.close()


if __name__ == "__main__":
    main()
