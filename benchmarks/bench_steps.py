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
and checks that both forms give the same loss (and gradient) before timing them.

Peak memory on the CPU is how far the process's resident high-water mark (Linux VmHWM, reset
before each form through /proc/self/clear_refs) rises while one form runs; on CUDA it is
torch's peak allocation.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cause_cli.model.bank import ConceptBank
from cause_cli.model.contrastive import concept_contrastive_loss
from cause_cli.model.heads import SegmentationHeads
from cause_cli.model.modularity import modularity_loss
from cause_cli.model.slow import LoopBank, loop_contrastive_loss


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


def bench_front_door(device: torch.device, dim: int, projection: int, batch: int, tokens: int, repeats: int) -> None:
    codes_total, capacity = 2048, 100
    generator = torch.Generator().manual_seed(1)
    clusterbook = torch.randn(codes_total, dim, generator=generator).to(device)
    normalised = F.normalize(clusterbook, dim=1)
    ring = ConceptBank(codes_total, projection, capacity, device)
    loop = LoopBank(codes_total, capacity)
    fill = torch.randn(codes_total * capacity, projection, generator=generator).to(device)
    fill_codes = torch.arange(codes_total, device=device).repeat_interleave(capacity)
    keys = torch.rand(fill_codes.numel(), generator=generator).to(device)
    # Give every code exactly 2 x capacity tokens once: half of them fill it to capacity.
    doubled = torch.cat([fill_codes, fill_codes])
    ring.update(doubled, torch.cat([fill, fill]), torch.cat([keys, keys + 1]))
    loop.update(doubled, torch.cat([fill, fill]), torch.cat([keys, keys + 1]))
    assert int(ring.filled.min()) == capacity

    features = torch.randn(batch, tokens, dim, generator=generator).to(device)
    torch.manual_seed(2)
    heads = SegmentationHeads(dim, 90, projection, 27).to(device).train()
    optimiser = torch.optim.Adam(heads.student_parameters(), lr=1e-3)

    def step(fast: bool) -> float:
        codes = (F.normalize(features, dim=-1) @ normalised.t()).argmax(dim=-1)
        with torch.no_grad():
            teacher = heads.teacher_projection(heads.teacher(features))
        student = heads.student_projection(heads.student(features))
        if fast:
            bank_features, bank_codes = ring.entries()
            loss = concept_contrastive_loss(student, teacher, normalised[codes], bank_features, normalised[bank_codes])
        else:
            bank_features, bank_vectors = loop.flat(clusterbook)
            loss = loop_contrastive_loss(student, teacher, normalised[codes], bank_features, bank_vectors)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        heads.update_teacher(0.99)
        # Update with the same keys for both, so that both banks stay equal (and full).
        update_keys = torch.rand(codes.numel(), generator=torch.Generator().manual_seed(3)).to(device)
        (ring if fast else loop).update(codes, teacher, update_keys)
        return loss.item()

    state = {k: v.clone() for k, v in heads.state_dict().items()}
    fast_loss = step(True)
    heads.load_state_dict(state)
    slow_loss = step(False)
    assert abs(fast_loss - slow_loss) <= 1e-5 * abs(slow_loss), (fast_loss, slow_loss)
    fast_time = timed(lambda: step(True), device, repeats)
    slow_time = timed(lambda: step(False), device, repeats)
    print(
        f"front-door   K=2048 full bank ({codes_total * capacity} entries) B={batch} P={tokens} D={dim} "
        f"E={projection}: loop {slow_time * 1e3:.0f} ms, vectorised {fast_time * 1e3:.0f} ms "
        f"(speed-up x{slow_time / fast_time:.2f}); loss equal: {fast_loss:.6f} vs {slow_loss:.6f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--full", action="store_true", help="the paper's shapes (for a GPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dim", type=int, default=384)
    args = parser.parse_args()
    device = torch.device(args.device)
    bench_clusterbook(device, args.dim, args.repeats)
    if args.full:
        bench_front_door(device, args.dim, projection=2048, batch=16, tokens=100, repeats=args.repeats)
    else:
        # The loop form rebuilds the whole bank (features and code vectors) by concatenation
        # every step, which costs time quadratic in the bank's size: small widths keep it to
        # seconds on a CPU.
        bench_front_door(device, 64, projection=32, batch=4, tokens=16, repeats=args.repeats)


if __name__ == "__main__":
    main()
