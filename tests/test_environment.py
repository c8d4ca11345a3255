"""The locked environment and the packaging: requirements.lock agrees with pyproject.toml,
environment.yml is generated from the same source, the wheel's metadata is complete."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import ROOT
from defectfusion.core.environment import (
    CONDA_FILE,
    LOCK_FILE,
    _check_met,
    closure,
    conda_text,
    installed_problems,
    lock_problems,
    read_lock,
)
from defectfusion.core.errors import UserError


def test_the_lock_agrees_with_pyproject() -> None:
    """Every dependency of pyproject.toml (and of its dev extra) is pinned, inside its range."""
    assert lock_problems(ROOT / "pyproject.toml", ROOT / LOCK_FILE) == []


def test_environment_yml_is_generated_from_the_lock() -> None:
    assert (ROOT / CONDA_FILE).read_text(encoding="utf-8") == conda_text()
    assert f'"-r {LOCK_FILE}"' in conda_text()


def test_a_lock_that_disagrees_is_listed(tmp_path: Path) -> None:
    lock = tmp_path / "r.lock"
    pins = read_lock(ROOT / LOCK_FILE)
    pins["torch"] = "2.13.0"  # below pyproject's >=2.14.1
    del pins["snakemake"]
    lock.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()), encoding="utf-8")
    problems = lock_problems(ROOT / "pyproject.toml", lock)
    assert any(p.startswith("torch: locked at 2.13.0") for p in problems)
    assert any(p.startswith("snakemake: in pyproject.toml, not in") for p in problems)


def test_a_malformed_lock_line_is_one_line(tmp_path: Path) -> None:
    lock = tmp_path / "r.lock"
    lock.write_text("# ok\nnumpy==2.0\ntorch>=2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"r.lock:3: 'torch>=2' is not NAME==VERSION"):
        read_lock(lock)


def test_the_installed_set_against_a_lock(tmp_path: Path) -> None:
    """`defectfusion env check` (CI runs it after installing the lock over a base that may
    hold more): a version off the lock, a package the lock leaves out and a pin nothing pulls
    in are each named; the lock written from this environment has none."""
    pins = closure()
    lock = tmp_path / "r.lock"
    lock.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()), encoding="utf-8")
    assert installed_problems(lock) == []
    changed = dict(pins, torch="2.13.0", **{"not-a-dependency": "1.0"})
    del changed["snakemake"]
    lock.write_text("".join(f"{n}=={v}\n" for n, v in changed.items()), encoding="utf-8")
    problems = installed_problems(lock)
    assert f"torch: installed {pins['torch']}, r.lock pins 2.13.0" in problems
    assert f"snakemake: installed {pins['snakemake']}, not in r.lock" in problems
    assert "not-a-dependency: pinned in r.lock, not pulled in by defectfusion[dev]" in problems
    assert len(problems) == 3


def test_an_unmet_requirement_is_named() -> None:
    from packaging.requirements import Requirement

    unmet: list[str] = []
    _check_met("defectfusion", Requirement("numpy<1"), unmet)
    _check_met("defectfusion", Requirement("numpy>=1"), unmet)
    assert len(unmet) == 1 and unmet[0].startswith("defectfusion requires numpy<1, numpy ")


def test_the_closure_is_what_this_package_pulls_in() -> None:
    pins = closure()
    assert {"torch", "transformers", "snakemake", "pytest"} <= set(pins)  # pytest: dev extra
    assert "defectfusion" not in pins  # installed from the checkout
    from importlib import metadata

    assert pins["torch"] == metadata.version("torch")


def test_packaging_metadata() -> None:
    """package-data named prompts/*.yaml, which matched nothing, and the wheel had no
    authors, classifiers or keywords (issue 28)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project = pyproject["project"]
    assert project["authors"] and project["classifiers"] and project["keywords"]
    for package, globs in pyproject["tool"]["setuptools"].get("package-data", {}).items():
        for pattern in globs:
            assert list((ROOT / "code" / package).glob(pattern)), pattern
    for name in ("CONTRIBUTING.md", "CHANGELOG.md", "CITATION.cff", "LICENSE"):
        assert (ROOT / name).is_file(), name
