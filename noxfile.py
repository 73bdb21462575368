"""Development tasks: `nox -s tests`, `nox -s lint`, `nox -s typecheck`, `nox -s demo`,
`nox -s package` (build, twine check, and the wheel installed and run).

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
    session.run("ruff", "check", "src", "tests", "benchmarks", "mutants", "noxfile.py")
    # The contract reads the source tree; nothing of the package is imported or installed.
    session.run("lint-imports", "--no-cache", env={"PYTHONPATH": "src"})


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy over the package."""
    install_package(session, "test")
    session.install("mypy>=1.10")
    session.run("mypy")


@nox.session
def mutants(session: nox.Session) -> None:
    """The mutation sweep (mutants/catalogue.py): minutes on two cores, so not in CI."""
    install_package(session, "test")
    session.run("python", "mutants/run.py", *session.posargs)


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


# What a complete test tree in the source distribution needs beside the test files.
SDIST_TEST_HELPERS = ("tests/__init__.py", "tests/conftest.py", "tests/helpers.py", "tests/fake_hub.py")


@nox.session
def package(session: nox.Session) -> None:
    """Build the sdist and the wheel, check them with twine, then install the wheel (not the
    checkout) in this session's environment and run `cause --help` and `cause info` from it."""
    import shutil
    import tarfile
    from pathlib import Path

    session.install("build>=1.2", "twine>=5")
    dist = Path(session.create_tmp()) / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.run("python", "-m", "build", "--outdir", str(dist))
    built = sorted(dist.iterdir())
    session.run("twine", "check", "--strict", *map(str, built))
    (sdist,) = [path for path in built if path.name.endswith(".tar.gz")]
    (wheel,) = [path for path in built if path.suffix == ".whl"]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    missing = [helper for helper in SDIST_TEST_HELPERS if helper not in names]
    if missing or "LICENSE" not in names:
        session.error(f"the sdist lacks {', '.join(missing or ['LICENSE'])}")
    session.install(*torch_pins())
    session.install(str(wheel))
    session.install("--force-reinstall", "--no-deps", str(wheel))  # this build, also in a reused environment
    session.chdir(session.create_tmp())  # away from the checkout, so only the installed wheel is importable
    session.run("python", "-c", "import cause_cli, pathlib; assert 'site-packages' in cause_cli.__file__; "
                "assert (pathlib.Path(cause_cli.__file__).parent / 'py.typed').is_file()")  # fmt: skip
    session.run("cause", "--help", silent=True)
    session.run("cause", "info")
