"""Dense CRF refinement (METHOD.md section 4) with the paper's settings, by one of two backends.

``pydensecrf``: the optional ``pydensecrf`` module (the ``pydensecrf2`` package, ``pip install
cause-cli[crf]``, a compiled extension), imported only when a CRF is asked for, on a pool of
worker processes. ``torch``: the same model in torch (:mod:`.crf_torch`), on the device the
scores are on, nothing to compile. ``auto`` is torch on a GPU, pydensecrf on a CPU where it is
installed (faster there), torch otherwise. Settings: 10
mean-field iterations; a Gaussian kernel (sxy 1, compat 3) and a bilateral kernel (sxy 67,
srgb 3, compat 4) on the 8-bit image, passed in BGR order as the reference does.

Each image is independent, so images go to a process pool. A worker that dies is replaced
and its images are tried once more; one that hangs past the time limit stops the run with one
sentence. Nothing waits forever.
"""

from __future__ import annotations

import collections
import concurrent.futures as futures
import multiprocessing
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..devices import available_cpus
from ..errors import CauseError

ITERATIONS = 10
GAUSSIAN_SXY, GAUSSIAN_COMPAT = 1, 3
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT = 67, 3, 4
# Seconds an image may take before its worker counts as hung (about 1.5 s for 320 x 320 with
# 27 labels on one core; this leaves room for large images and busy machines).
SECONDS_PER_IMAGE_LIMIT = 120.0

MISSING_MESSAGE = (
    "The pydensecrf backend of the dense CRF needs the pydensecrf module: install it with "
    "'pip install cause-cli[crf]' (or pip install pydensecrf2), or use --crf-backend torch."
)
CRF_BACKENDS = ("auto", "pydensecrf", "torch")
TORCH_CRF_PIXELS = 1 << 22  # pixels refined in one lattice by the torch backend (memory grows with them)


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def require_crf() -> None:
    if not crf_available():
        raise CauseError(MISSING_MESSAGE)


def choose_crf_backend(requested: str, device: torch.device) -> str:
    """The backend that runs: ``auto`` is torch on a GPU, pydensecrf on a CPU where it is
    installed, torch otherwise; pydensecrf asked for and missing is one sentence."""
    if requested not in CRF_BACKENDS:
        raise CauseError(f"--crf-backend takes one of {', '.join(CRF_BACKENDS)}, not '{requested}'.")
    if requested == "pydensecrf":
        require_crf()
        return requested
    if requested == "torch" or device.type == "cuda":
        return "torch"
    return "pydensecrf" if crf_available() else "torch"


def open_crf(backend: str, workers: int, device: torch.device) -> CRFPool | TorchCRF:
    """The chosen backend's refiner (started): a pool of pydensecrf workers, or the torch CRF
    on ``device``."""
    if backend == "torch":
        return TorchCRF(device)
    pool = CRFPool(workers)
    pool.start()
    return pool


def dense_crf(image: np.ndarray, log_probabilities: np.ndarray) -> np.ndarray:
    """Refine ``log_probabilities [C, H, W]`` for the RGB ``uint8`` ``image [H, W, 3]``.

    Returns the mean-field marginals ``float32 [C, H, W]``.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    classes, height, width = log_probabilities.shape
    shifted = log_probabilities - log_probabilities.max(axis=0, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    unary = np.ascontiguousarray(unary_from_softmax(probabilities.astype(np.float32)), dtype=np.float32)
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    model = dcrf.DenseCRF2D(width, height, classes)
    model.setUnaryEnergy(unary)
    model.addPairwiseGaussian(sxy=GAUSSIAN_SXY, compat=GAUSSIAN_COMPAT)
    model.addPairwiseBilateral(sxy=BILATERAL_SXY, srgb=BILATERAL_SRGB, rgbim=bgr, compat=BILATERAL_COMPAT)
    marginals = model.inference(ITERATIONS)
    return np.asarray(marginals, dtype=np.float32).reshape(classes, height, width)


def crf_labels(image: np.ndarray, log_probabilities: np.ndarray) -> np.ndarray:
    """The label map ``[H, W]`` after the dense CRF: what a worker sends back (a byte a pixel
    up to 256 classes, not the ``4 C`` bytes of the marginals)."""
    marginals = dense_crf(image, log_probabilities)
    return marginals.argmax(axis=0).astype(np.uint8 if len(marginals) <= 256 else np.int32)


CRFJob = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class CRFPool:
    """Runs a CRF job (:func:`crf_labels` unless told otherwise) over many images, serially
    (``workers=0``) or in processes. :meth:`submit` returns at once, so the caller's GPU
    work goes on while the workers refine."""

    workers: int = 0
    job: CRFJob | None = None  # None: this module's crf_labels, looked up when the pool is made
    seconds_per_image: float = SECONDS_PER_IMAGE_LIMIT

    def __post_init__(self) -> None:
        require_crf()
        self._job: CRFJob = self.job or sys.modules[__name__].crf_labels
        self._executor: futures.ProcessPoolExecutor | None = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            _shut_down(self._executor)
            self._executor = None

    def _pool(self) -> futures.ProcessPoolExecutor:
        if self._executor is None:
            # 'spawn' keeps the workers free of the parent's threads and CUDA state.
            context = multiprocessing.get_context("spawn")
            self._executor = futures.ProcessPoolExecutor(self.workers, mp_context=context)
        return self._executor

    def start(self) -> None:
        """Start every worker now, each running the job once on a one-pixel image (which
        imports what it needs), so that the first batches do not wait for them."""
        if self.workers == 0:
            return
        pixel, scores = np.zeros((1, 1, 3), dtype=np.uint8), np.zeros((1, 1, 1), dtype=np.float32)
        try:
            self._wait(self._submit_all([pixel] * self.workers, [scores] * self.workers))
        except futures.process.BrokenProcessPool:
            self.close()  # made anew on the first submission, which retries as usual

    def submit(
        self, images: Sequence[np.ndarray | torch.Tensor], log_probabilities: Sequence[np.ndarray | torch.Tensor]
    ) -> PendingResults:
        """Start the job on every (image, log-probabilities) pair, as arrays (tensors are copied
        from where they are); in this process and at once with no workers."""
        pictures = [_array(image) for image in images]
        scores = [_array(scores) for scores in log_probabilities]
        if len(pictures) != len(scores):
            raise ValueError(f"{len(pictures)} images and {len(scores)} score maps")
        if self.workers == 0:
            return PendingResults(self, pictures, scores, [], list(map(self._job, pictures, scores)))
        return PendingResults(self, pictures, scores, self._submit_all(pictures, scores))

    def run(
        self, images: Sequence[np.ndarray | torch.Tensor], log_probabilities: Sequence[np.ndarray | torch.Tensor]
    ) -> list[np.ndarray]:
        """The job's results for each pair, in order, once all are done."""
        return self.submit(images, log_probabilities).result()

    def _submit_all(self, images: list[np.ndarray], log_probabilities: list[np.ndarray]) -> list[futures.Future]:
        pool = self._pool()
        return [pool.submit(self._job, image, scores) for image, scores in zip(images, log_probabilities, strict=True)]

    def _collect(self, pending: PendingResults) -> list[np.ndarray]:
        try:
            return self._wait(pending.futures)
        except futures.process.BrokenProcessPool:
            # A worker died (killed, out of memory): replace the pool and try these images once more.
            self.close()
            try:
                return self._wait(self._submit_all(pending.images, pending.log_probabilities))
            except futures.process.BrokenProcessPool as error:
                self.close()
                raise CauseError(
                    "A dense CRF worker died twice on the same images; rerun with --crf-workers 0 to find the cause."
                ) from error

    def _wait(self, submitted: list[futures.Future]) -> list[np.ndarray]:
        try:
            return [future.result(timeout=self.seconds_per_image) for future in submitted]
        except futures.TimeoutError as error:
            self.close()
            raise CauseError(
                f"A dense CRF worker took longer than {self.seconds_per_image:.0f} s on one image and was stopped."
            ) from error


@dataclass
class TorchCRF:
    """The torch backend behind the pool's interface: each submission is refined at once on
    ``device``, images and scores taken where they are (arrays are copied there), many images
    in one lattice; the label maps stay on the device."""

    device: torch.device
    workers: int = 0

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass

    def submit(self, images: Sequence[Any], log_probabilities: Sequence[Any]) -> RefinedNow:
        from .crf_torch import crf_label_maps

        if len(images) != len(log_probabilities):
            raise ValueError(f"{len(images)} images and {len(log_probabilities)} score maps")
        pictures = [_on(self.device, image) for image in images]
        scores = [_on(self.device, values) for values in log_probabilities]
        maps: list[torch.Tensor] = []
        start = 0
        while start < len(pictures):
            end, pixels = start, 0
            while end < len(pictures) and (end == start or pixels + _pixels(pictures[end]) <= TORCH_CRF_PIXELS):
                pixels += _pixels(pictures[end])
                end += 1
            maps.extend(crf_label_maps(pictures[start:end], scores[start:end]))
            start = end
        return RefinedNow(maps)

    def run(self, images: Sequence[Any], log_probabilities: Sequence[Any]) -> list[torch.Tensor]:
        return self.submit(images, log_probabilities).result()


def _on(device: torch.device, values: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(values, np.ndarray) and not values.flags.writeable:
        values = values.copy()  # torch would warn of a tensor sharing memory nobody may write
    return torch.as_tensor(values, device=device)


def _array(values: np.ndarray | torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else values


def _pixels(image: torch.Tensor) -> int:
    return int(image.shape[0]) * int(image.shape[1])


@dataclass
class RefinedNow:
    """Label maps already computed (the torch backend's), as a submission's results."""

    maps: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.maps)

    def result(self) -> list[torch.Tensor]:
        return self.maps


@dataclass
class PendingResults:
    """One submission's results, still being computed (or done, without workers)."""

    pool: CRFPool
    images: list[np.ndarray]
    log_probabilities: list[np.ndarray]
    futures: list[futures.Future]
    done: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images)

    def result(self) -> list[np.ndarray]:
        """Wait for every result (in submission order)."""
        if self.done is None:
            self.done = self.pool._collect(self)
        return self.done


class CRFQueue:
    """Submissions in flight while the caller goes on, handed to their callbacks in order.

    At most ``limit`` images wait beyond the newest submission (twice the workers keeps every
    worker busy), so memory stays bounded and the GPU never waits on more CRF than that.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._waiting: collections.deque[tuple[PendingResults | RefinedNow, Callable[[list[Any]], None]]] = (
            collections.deque()
        )
        self._images = 0

    def put(self, pending: PendingResults | RefinedNow, when_done: Callable[[list[Any]], None]) -> None:
        self._waiting.append((pending, when_done))
        self._images += len(pending)
        while len(self._waiting) > 1 and self._images - len(pending) > self.limit:
            self._finish_oldest()

    def drain(self) -> None:
        while self._waiting:
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        pending, when_done = self._waiting.popleft()
        self._images -= len(pending)
        when_done(pending.result())


def _shut_down(executor: futures.ProcessPoolExecutor) -> None:
    """Stop a pool without waiting for hung workers."""
    processes = list(getattr(executor, "_processes", {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5)


def default_workers(given: int | None = None) -> int:
    """``given`` CRF workers, or by default one per CPU this process may use (affinity and
    container quota)."""
    return available_cpus() if given is None else given
