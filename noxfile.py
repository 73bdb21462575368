"""Development tasks: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s demo`.

torch and torchvision are pinned here (not in the package) to a pair that works together on
the machine: set CAUSE_TORCH_PINS to override, e.g. "torch==2.9.1 torchvision==0.24.1".
"""

from __future__ import annotations

import os
import platform

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

DEFAULT_PINS = {
    "x86_64": "torch==2.14.1 torchvision==0.29.1",
    "aarch64": "torch==2.9.1 torchvision==0.24.1",
}


def torch_pins() -> list[str]:
    pins = os.environ.get("CAUSE_TORCH_PINS") or DEFAULT_PINS.get(platform.machine(), "torch torchvision")
    return pins.split()


def install_package(session: nox.Session, extras: str) -> None:
    session.install(*torch_pins())
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite."""
    install_package(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, and the layers contract of pyproject.toml (import-linter): nothing imports upward."""
    session.install("ruff>=0.6,<0.18", "import-linter>=2.1")
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    # The contract reads the source tree; nothing of the package is imported or installed.
    session.run("lint-imports", "--no-cache", env={"PYTHONPATH": "src"})


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    install_package(session, "test")
    session.install("mypy>=1.10")
    session.run("mypy")


@nox.session(name="gpu-check")
def gpu_check(session: nox.Session) -> None:
    """Everything a GPU changes, on one GPU in a few minutes (``-- --small``: on the CPU)."""
    install_package(session, "test")
    session.run("python", "benchmarks/gpu_check.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Install the toolkit and run `cause demo`."""
    install_package(session, "crf")
    session.run("cause", "demo", *session.posargs)
