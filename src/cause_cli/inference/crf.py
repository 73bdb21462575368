"""Dense CRF refinement (METHOD.md section 4) with the paper's settings, on a pool of workers.

The dense CRF comes from the optional ``pydensecrf`` module (the ``pydensecrf2`` package,
``pip install cause-cli[crf]``), imported only when a CRF is asked for. Settings: 10
mean-field iterations; a Gaussian kernel (sxy 1, compat 3) and a bilateral kernel (sxy 67,
srgb 3, compat 4) on the 8-bit image, passed in BGR order as the reference does.

Each image is independent, so images go to a process pool. A worker that dies is replaced
and its images are tried once more; one that hangs past the time limit stops the run with one
sentence. Nothing waits forever.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import CauseError

ITERATIONS = 10
GAUSSIAN_SXY, GAUSSIAN_COMPAT = 1, 3
BILATERAL_SXY, BILATERAL_SRGB, BILATERAL_COMPAT = 67, 3, 4
# Seconds an image may take before its worker counts as hung (about 1.5 s for 320 x 320 with
# 27 labels on one core; this leaves room for large images and busy machines).
SECONDS_PER_IMAGE_LIMIT = 120.0

MISSING_MESSAGE = (
    "The dense CRF needs the pydensecrf module: install it with 'pip install cause-cli[crf]' "
    "(or pip install pydensecrf2), or run without the CRF (--no-crf)."
)


def crf_available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def require_crf() -> None:
    if not crf_available():
        raise CauseError(MISSING_MESSAGE)


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


CRFJob = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class CRFPool:
    """Runs :func:`dense_crf` over many images, serially (``workers=0``) or in processes."""

    workers: int = 0
    job: CRFJob | None = None  # None: this module's dense_crf, looked up when the pool is made
    seconds_per_image: float = SECONDS_PER_IMAGE_LIMIT

    def __post_init__(self) -> None:
        require_crf()
        self._job: CRFJob = self.job or sys.modules[__name__].dense_crf
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

    def run(self, images: Sequence[np.ndarray], log_probabilities: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Marginals for each (image, log-probabilities) pair, in order."""
        if self.workers == 0:
            return [self._job(image, scores) for image, scores in zip(images, log_probabilities, strict=True)]
        try:
            return self._run_in_pool(images, log_probabilities)
        except futures.process.BrokenProcessPool:
            # A worker died (killed, out of memory): replace the pool and try these images once more.
            self.close()
            try:
                return self._run_in_pool(images, log_probabilities)
            except futures.process.BrokenProcessPool as error:
                self.close()
                raise CauseError(
                    "A dense CRF worker died twice on the same images; rerun with --workers 0 to find the cause."
                ) from error

    def _run_in_pool(self, images: Sequence[np.ndarray], log_probabilities: Sequence[np.ndarray]) -> list[np.ndarray]:
        pool = self._pool()
        submitted = [
            pool.submit(self._job, image, scores) for image, scores in zip(images, log_probabilities, strict=True)
        ]
        try:
            return [future.result(timeout=self.seconds_per_image) for future in submitted]
        except futures.TimeoutError as error:
            self.close()
            raise CauseError(
                f"A dense CRF worker took longer than {self.seconds_per_image:.0f} s on one image and was stopped."
            ) from error


def _shut_down(executor: futures.ProcessPoolExecutor) -> None:
    """Stop a pool without waiting for hung workers."""
    processes = list(getattr(executor, "_processes", {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5)


def default_workers() -> int:
    return max(1, (os.cpu_count() or 1))
