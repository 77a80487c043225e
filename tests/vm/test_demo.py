"""The end-to-end demonstration's scenarios as tests (the same code ``make demo`` runs)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import pytest

from . import demo, demo_root

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .image import RunImage

log = logging.getLogger("keyhandoff.vmtest")


def check(outcome: demo.Outcome) -> None:
    """Log the scenario's table, notes and problems; fail on any problem or prompt count."""
    summary = [demo.table([outcome]), *outcome.notes, *outcome.problems]
    for line in summary:
        log.info("  %s", line)
    assert outcome.passed, "\n".join(summary)
    assert outcome.prompts == outcome.expected_prompts


@pytest.fixture(scope="module")
def demo_image(vm_image_factory: Callable[..., RunImage]) -> RunImage:
    """Base + this checkout, with keyhandoff's units, PAM module and the simulated person."""
    return vm_image_factory(customize=demo.customize)


@pytest.mark.vm
@pytest.mark.parametrize("name", list(demo.SCENARIOS))
def test_scenario(name: str, demo_image: RunImage, tmp_path: Path) -> None:
    log.info("demo scenario %s", name)
    outcome = demo.SCENARIOS[name](demo_image, tmp_path)
    check(outcome)


@pytest.fixture(scope="module")
def root_images(
    vm_image_factory: Callable[..., RunImage], tmp_path_factory: pytest.TempPathFactory,
) -> demo_root.RootImages:
    """Encrypted-root images (dracut, initramfs-tools, the PackageKit guests), built on first use.

    ``vm_image_factory``: the same check for QEMU/OVMF (skip, or fail under CI) and base.
    """
    del vm_image_factory
    return demo_root.RootImages(tmp_path_factory.mktemp("root-images"))


ROOT_SCENARIOS = demo_root.all_root_scenarios()  # the PackageKit ones (the longest) first


def _root_params() -> list[Any]:
    """One parameter per root scenario, grouped by the image it boots (one build per worker)."""
    assert set(demo_root.ROOT_GENERATOR) == set(ROOT_SCENARIOS)
    return [
        pytest.param(name, marks=pytest.mark.xdist_group(f"root-{demo_root.ROOT_GENERATOR[name]}"))
        for name in ROOT_SCENARIOS
    ]


@pytest.mark.vm
@pytest.mark.parametrize("name", _root_params())
def test_root_scenario(name: str, root_images: demo_root.RootImages, tmp_path: Path) -> None:
    log.info("demo scenario %s", name)
    outcome = ROOT_SCENARIOS[name](root_images, tmp_path)
    check(outcome)
