"""The installed packages are the set CI tested (constraints.txt): a fresh install with the README's command gets
exactly those versions; anything else is named here, with how to move the pins forward (constraints.txt's header)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pinned() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_installed_versions_are_the_tested_ones() -> None:
    pins = pinned()
    assert {"torch", "deepspeed", "monai", "nibabel", "fairscale", "tensorboard"} <= set(pins)
    differ = []
    for name, want in pins.items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            differ.append(f"{name}: not installed (tested {want})")
            continue
        if have.split("+")[0] != want:  # torch's local label (+cpu, +cu128) is the build, not the version
            differ.append(f"{name}: {have} installed, {want} tested")
    assert not differ, (
        "installed versions differ from constraints.txt (install with -c constraints.txt, or move the pins as its "
        "header says): " + "; ".join(differ)
    )


def test_pyproject_bounds_admit_the_tested_versions() -> None:
    """Every upper bound in pyproject.toml lets the pinned version in (a bound moved without the pins fails here)."""
    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    pins = {normalise(k): v for k, v in pinned().items()}
    requirements = re.findall(r'"([A-Za-z0-9_.-]+[<>=!~][^"]*)"', text)
    checked = 0
    for spec in requirements:
        req = Requirement(spec)
        version = pins.get(normalise(req.name))
        if version is not None and req.specifier:
            assert req.specifier.contains(version, prereleases=True), f"{spec} excludes the tested {version}"
            checked += 1
    assert checked >= 10
