"""Everything a GPU changes, checked in one command on one GPU, in about eight minutes.

    python benchmarks/gpu_check.py            # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --small    # on the CPU (CI): tiny shapes, the same code paths

It runs the CUDA-only tests and ``bench_steps.py --full``; trains the paper's shapes (a ViT-S/8
with random weights at 320 pixels, batch 16, K = 2048 codes, a full concept bank) for a few
hundred steps in bfloat16 and again in float16 with loss scaling; evaluates with the dense
CRF; segments with and without the CRF. It prints, per part: steps/s and peak GPU memory of
each training step, the finished run's figures (which must be finite), images/s of
``cause segment`` with and without the CRF beside the backbone's own images/s, the I/O floor
(``segment_scale.py``: the same images decoded, resized, encoded and written with no model)
and the CRF's alone, and how much of the CRF's time the segmenting hid behind GPU work.

A part that fails prints its error and the next part runs; the exit status is 1 when any
part failed. With ``--small`` the CUDA-only parts are skipped and the rest runs on the CPU
under CPU autocast, so the script never rots.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cause_cli.data.synthetic import write_scenes
from cause_cli.progress import Advance, Reporter

ROOT = Path(__file__).resolve().parents[1]
PAPER_BACKBONE, PAPER_TIMM_MODEL = "dino-vits8", "vit_small_patch8_224"


@dataclass(frozen=True)
class Shapes:
    backbone: str
    resolution: int
    batch_size: int
    clusterbook_size: int
    train_images: int
    val_images: int
    image_sizes: tuple[int, int]
    front_door_epochs: int
    probe_epochs: int


PAPER = Shapes(PAPER_BACKBONE, 320, 16, 2048, 128, 32, (320, 400), front_door_epochs=25, probe_epochs=2)
SMALL = Shapes("toy", 64, 4, 32, 8, 4, (64, 80), front_door_epochs=2, probe_epochs=1)


@dataclass
class TaskTiming:
    description: str
    total: int | None
    done: int = 0
    seconds: float = 0.0
    peak_bytes: int | None = None


@dataclass
class TimingReporter(Reporter):
    """Records how long each progress task took, how many items it did and (on CUDA) the
    peak memory allocated while it ran."""

    device: torch.device
    tasks: list[TaskTiming] = field(default_factory=list)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, unit: str = "it", done: int = 0) -> Iterator[Advance]:
        timing = TaskTiming(description, total)
        self.tasks.append(timing)

        def advance(steps: int = 1) -> None:
            timing.done += steps

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        try:
            yield advance
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                timing.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            timing.seconds = time.perf_counter() - started


@dataclass
class Outcome:
    part: str
    ok: bool
    seconds: float
    lines: list[str]


def run_part(part: str, body: Callable[[], list[str]], outcomes: list[Outcome]) -> None:
    print(f"\n== {part}", flush=True)
    started = time.perf_counter()
    try:
        lines = body()
        ok = True
    except Exception:  # a failed part is reported and the check goes on
        lines = traceback.format_exc().rstrip().splitlines()
        ok = False
    outcome = Outcome(part, ok, time.perf_counter() - started, lines)
    for line in lines:
        print(f"   {line}", flush=True)
    print(f"   -> {'ok' if ok else 'FAILED'} in {outcome.seconds:.0f} s", flush=True)
    outcomes.append(outcome)


def environment_lines(device: torch.device) -> list[str]:
    from cause_cli.devices import compute_dtype

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}, device {device}"]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.append(
            f"{properties.name}: compute capability {properties.major}.{properties.minor}, "
            f"{properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} multiprocessors"
        )
    from cause_cli.inference.crf import crf_available, default_workers

    lines.append(f"automatic precision: {compute_dtype(device)}; dense CRF installed: {crf_available()}")
    lines.append(f"CRF workers by default: {default_workers()} (os.cpu_count {os.cpu_count()})")
    return lines


def subprocess_lines(command: list[str], timeout: float) -> list[str]:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    output = (done.stdout + done.stderr).strip().splitlines()
    if done.returncode != 0:
        raise RuntimeError("\n".join([f"{' '.join(command)} exited with {done.returncode}:", *output[-40:]]))
    return output[-15:]


def prepare_backbone(shapes: Shapes, home: Path) -> None:
    """A randomly initialised backbone in the cache, through the user's conversion path."""
    if shapes.backbone != PAPER_BACKBONE:
        return  # the toy backbone is made on first use
    import timm
    from safetensors.torch import save_file

    from cause_cli.backbones import fetch_backbones

    target = home / "random-vits8.safetensors"
    torch.manual_seed(0)
    model = timm.create_model(PAPER_TIMM_MODEL, pretrained=False, num_classes=0)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(target))
    fetch_backbones([PAPER_BACKBONE], from_file=target)


def train_part(
    shapes: Shapes, data: Path, run: Path, device: torch.device, precision: str, cache_features: bool = False
) -> list[str]:
    from cause_cli.config import TrainConfig
    from cause_cli.runs import open_run
    from cause_cli.training import train

    config = TrainConfig(
        data_dir=str(data),
        backbone=shapes.backbone,
        resolution=shapes.resolution,
        batch_size=shapes.batch_size,
        clusterbook_size=shapes.clusterbook_size,
        epochs_clusterbook=1,
        epochs_front_door=2 if cache_features else shapes.front_door_epochs,
        epochs_cluster_probe=shapes.probe_epochs,
        probe_refine=True,  # the probe's own training runs too, with its loss scaling
        precision=precision,
        checkpoint_seconds=30.0,
        cache_features="on" if cache_features else "off",
    )
    reporter = TimingReporter(device)
    train(config, run, str(device), reporter)
    lines = []
    for task in reporter.tasks:
        rate = task.done / task.seconds if task.seconds else math.nan
        memory = "" if task.peak_bytes is None else f", peak {task.peak_bytes / 2**30:.2f} GiB"
        lines.append(f"{task.description}: {task.done} steps in {task.seconds:.1f} s = {rate:.2f} steps/s{memory}")
    tensors = open_run(run).load_tensors
    for name in ("clusterbook.safetensors", "head.safetensors", "probe.safetensors"):
        for key, value in tensors(name).items():
            if not torch.isfinite(value.float()).all():
                raise RuntimeError(f"{precision}: {name} holds non-finite values in {key}")
    lines.append(f"{precision}{' (feature cache)' if cache_features else ''}: every trained weight is finite")
    return lines


def evaluate_part(run: Path, device: torch.device) -> list[str]:
    """eval with the CRF through each backend there is: images/s of each, and their figures."""
    from cause_cli.inference.crf import crf_available, default_workers
    from cause_cli.inference.evaluate import EvaluationSettings, evaluate_run

    lines = []
    figures = {}
    for backend in ("torch", "pydensecrf") if crf_available() else ("torch",):
        reporter = TimingReporter(device)
        started = time.perf_counter()
        settings = EvaluationSettings(device=str(device), crf=True, crf_workers=default_workers(), baselines=False,
                                      crf_backend=backend)  # fmt: skip
        result = evaluate_run(run, settings, reporter, write=False)
        seconds = time.perf_counter() - started
        lines += [f"{backend}: {task.description}: {task.done} in {task.seconds:.1f} s" for task in reporter.tasks]
        rate = result["images"] / seconds
        lines.append(f"{backend}: eval with the CRF {rate:.1f} images/s ({result['images']} images)")
        lines.append(f"mIoU {result['miou']:.1f}, pixel accuracy {result['pixel_accuracy']:.1f}")
        lines.append(
            f"{backend}: with CRF mIoU {result['crf']['miou']:.2f}, "
            f"pixel accuracy {result['crf']['pixel_accuracy']:.2f}"
        )
        figures[backend] = (rate, result["crf"]["miou"])
        for key in ("miou", "pixel_accuracy"):
            if not math.isfinite(result[key]):
                raise RuntimeError(f"evaluation gave {key} = {result[key]}")
    if len(figures) == 2:
        (torch_rate, torch_miou), (pool_rate, pool_miou) = figures["torch"], figures["pydensecrf"]
        lines.append(
            f"eval with the CRF: torch {torch_rate / pool_rate:.1f} x pydensecrf's speed ({default_workers()} "
            f"processes); CRF mIoU {torch_miou:.2f} against {pool_miou:.2f}"
        )
    return lines


def backbone_images_per_second(run: Path, device: torch.device, batch_size: int, batches: int) -> float:
    from cause_cli.inference.predict import load_trained
    from cause_cli.runs import open_run

    model = load_trained(open_run(run), device)
    images = torch.randn(batch_size, 3, model.resolution, model.resolution, device=device)
    model.backbone(images)  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(batches):
        model.backbone(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * batch_size / (time.perf_counter() - started)


def crf_seconds(images: int, classes: int, size: int, workers: int) -> tuple[float, float]:
    """Seconds to start a CRF pool's workers, and then to refine ``images`` random images."""
    from cause_cli.inference.crf import CRFPool

    generator = np.random.default_rng(0)
    pictures = [generator.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(images)]
    scores = np.log(generator.dirichlet(np.ones(classes), (size, size)).transpose(2, 0, 1)).astype(np.float32)
    with CRFPool(workers) as pool:
        started = time.perf_counter()
        pool.start()
        start_seconds = time.perf_counter() - started
        started = time.perf_counter()
        pool.run(pictures, [scores] * images)
        return start_seconds, time.perf_counter() - started


def segment_part(shapes: Shapes, data: Path, run: Path, out: Path, device: torch.device) -> list[str]:
    from segment_scale import floor_images_per_second  # beside this script

    from cause_cli.inference.crf import crf_available, default_workers
    from cause_cli.inference.outputs import DEFAULT_SAVE
    from cause_cli.inference.segment import SegmentSettings, segment_images
    from cause_cli.runs import open_run

    source = data / "images" / "val"
    count = len(list(source.glob("*.png")))
    workers = default_workers()
    lines = []
    seconds: dict[tuple[bool, str], float] = {}
    backends = ("torch", "pydensecrf") if crf_available() else ("torch",)
    for crf, backend in [(False, "auto"), *((True, name) for name in backends)]:
        started = time.perf_counter()
        settings = SegmentSettings(device=str(device), batch_size=shapes.batch_size, crf=crf, crf_workers=workers,
                                   crf_backend=backend)  # fmt: skip
        segment_images(source, run, out / f"crf-{crf}-{backend}", settings)
        seconds[(crf, backend)] = time.perf_counter() - started
    backbone_rate = backbone_images_per_second(run, device, shapes.batch_size, batches=8)
    floor_rate = floor_images_per_second(sorted(source.glob("*.png")), out / "floor", shapes.resolution, DEFAULT_SAVE)
    segment_rate = count / seconds[(False, "auto")]
    lines.append(f"backbone alone: {backbone_rate:.1f} images/s at {shapes.resolution}")
    lines.append(f"I/O floor (decoded, resized, encoded and written, no model): {floor_rate:.1f} images/s")
    lines.append(
        f"cause segment without CRF: {segment_rate:.1f} images/s, {segment_rate / backbone_rate:.2f} of the backbone's "
        f"speed and {segment_rate / floor_rate:.2f} of the I/O floor"
    )
    lines.append(f"cause segment with the torch CRF: {count / seconds[(True, 'torch')]:.1f} images/s")
    if (True, "pydensecrf") in seconds:
        classes = open_run(run).config().num_classes or 1
        start, alone = crf_seconds(count, classes, shapes.image_sizes[0], workers)
        with_crf = seconds[(True, "pydensecrf")] - start  # segment_images starts its pool the same way
        lines.append(
            f"cause segment with the pydensecrf CRF: {count / with_crf:.1f} images/s after {start:.1f} s starting "
            f"{workers} workers; the torch CRF {with_crf / seconds[(True, 'torch')]:.1f} x as fast"
        )
        lines.append(f"pydensecrf CRF alone ({workers} workers): {count / alone:.1f} images/s")
        # With the CRF, segmenting takes at least the longer of the two; their sum means no overlap.
        hidden = (seconds[(False, "auto")] + alone - with_crf) / min(seconds[(False, "auto")], alone)
        lines.append(f"overlap of model and CRF work: {100 * max(0.0, min(1.0, hidden)):.0f}% of the shorter hidden")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU (what CI runs)")
    parser.add_argument("--no-bench", action="store_true", help="skip the CUDA-only tests and bench_steps.py")
    parser.add_argument("--out", type=Path, help="keep the data and runs here (default: a temporary folder)")
    args = parser.parse_args()
    shapes = SMALL if args.small else PAPER
    device = torch.device("cpu" if args.small else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU here: run with --small for the CPU check.", file=sys.stderr)
        return 2
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="cause-gpu-check-") as scratch:
        work = args.out or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["CAUSE_HOME"] = str(work / "home")
        run_part("environment", lambda: environment_lines(device), outcomes)
        if device.type == "cuda" and not args.no_bench:
            python = sys.executable
            run_part(
                "CUDA-only tests",
                lambda: subprocess_lines([python, "-m", "pytest", "-q", "tests/test_cuda.py"], 240),
                outcomes,
            )
            run_part("bench_steps.py --full on CUDA", lambda: subprocess_lines(
                [python, "benchmarks/bench_steps.py", "--device", "cuda", "--full"], 300), outcomes)  # fmt: skip
        data = work / "scenes"
        run_part("data and backbone", lambda: _prepare(shapes, data, work / "home"), outcomes)
        for precision in ("bfloat16", "float16"):
            run = work / f"run-{precision}"
            run_part(
                f"train in {precision}",
                lambda run=run, precision=precision: train_part(shapes, data, run, device, precision),
                outcomes,
            )
        run_part(
            "train with --cache-features",
            lambda: train_part(shapes, data, work / "run-cached", device, "auto", cache_features=True),
            outcomes,
        )
        run = work / "run-bfloat16"
        run_part("evaluate with the CRF", lambda: evaluate_part(run, device), outcomes)
        run_part("segment", lambda: segment_part(shapes, data, run, work / "segments", device), outcomes)
    print("\n== summary")
    for outcome in outcomes:
        print(f"   {'ok    ' if outcome.ok else 'FAILED'} {outcome.part} ({outcome.seconds:.0f} s)")
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def _prepare(shapes: Shapes, data: Path, home: Path) -> list[str]:
    home.mkdir(parents=True, exist_ok=True)
    write_scenes(data, shapes.train_images, shapes.val_images, seed=0, size_range=shapes.image_sizes)
    prepare_backbone(shapes, home)
    return [f"{shapes.train_images} training and {shapes.val_images} validation scenes; backbone {shapes.backbone}"]


if __name__ == "__main__":
    sys.exit(main())
