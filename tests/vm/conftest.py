"""Fixtures for the UEFI VM tests: the cached base, a per-session run image, machines.

Missing QEMU/OVMF/debootstrap/busybox is a loud skip with the install command, and a failure
when ``CI`` is set (CI must have every real part).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from support.vm_progress import worker_sink, write_line

from .image import RunImage, build_run_image, ensure_base
from .machine import INSTALL_HINT, Machine, missing_parts

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger("keyhandoff.vmtest")

BUILD_TOOLS = ("debootstrap", "mkfs.ext4", "debugfs", "busybox", "qemu-img", "chroot")


def _require_vm_parts() -> None:
    missing = missing_parts() + [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if os.geteuid() != 0:
        missing.append("root (debootstrap and chroot need it)")
    if not missing:
        return
    message = f"VM test parts missing ({', '.join(missing)}); {INSTALL_HINT}"
    if os.environ.get("CI"):
        pytest.fail(f"CI must have every real part: {message}")
    pytest.skip(message)


class _TerminalHandler(logging.Handler):
    """Shows harness progress (the cold build takes minutes) even while output is captured.

    On a pytest-xdist worker the lines go to the controller (tests/support/vm_progress.py).
    """

    def __init__(self, config: pytest.Config) -> None:
        super().__init__(logging.INFO)
        self._reporter: Any = config.pluginmanager.get_plugin("terminalreporter")
        self._capture: Any = config.pluginmanager.get_plugin("capturemanager")
        self._sink = worker_sink()

    def emit(self, record: logging.LogRecord) -> None:
        if self._sink is not None:
            write_line(self._sink, record.getMessage())
            return
        if self._reporter is None:
            return
        line = f"[vm] {record.getMessage()}"
        if self._capture is None:
            self._reporter.write_line(line)
            return
        # fd capture would swallow the line; pytest's own live logging suspends it the same way.
        with self._capture.global_and_fixture_disabled():
            self._reporter.write_line(line)


# Longest first, so that two xdist workers finish together (Makefile: --no-loadscope-reorder
# keeps this order): a root scenario builds its image (minutes) and boots three times; a demo
# scenario boots one to three times; the firmware tests once or twice each.
_COST_RANK = {"test_root_scenario": 0, "test_scenario": 1}
_CHEAP = len(_COST_RANK)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent

    def rank(item: pytest.Item) -> tuple[int, int]:
        if here not in item.path.parents:
            return (0, 0)  # the rest of the suite keeps its place, ahead of tests/vm
        name = getattr(item, "originalname", item.name)
        return (1, _COST_RANK.get(name, _CHEAP))

    items.sort(key=rank)  # stable: the order within a rank is the collection's


@pytest.fixture(autouse=True)
def fresh_session_keyring() -> None:
    """Replaces the suite-wide host keyring guard for VM tests.

    VM tests never touch the host's keyring (the guest has its own kernel), and the guard's check
    of root's host-wide ``@u`` only picks up keys of other test runs on the same host.
    """


@pytest.fixture(scope="session")
def vm_progress(pytestconfig: pytest.Config) -> Iterator[None]:
    """Route the harness's progress lines to the terminal for the session."""
    handler = _TerminalHandler(pytestconfig)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)


@pytest.fixture(scope="session")
def vm_image_factory(vm_progress: None) -> Iterator[Callable[..., RunImage]]:
    """Build run images: ``factory(customize=fn)``; ``fn(rootfs: Path)`` edits the guest tree.

    Images live in a session temp dir that is removed at the end of the session.
    """
    _require_vm_parts()
    base = ensure_base()
    with tempfile.TemporaryDirectory(prefix="keyhandoff-vm-images-") as tmp:
        counter = 0

        def factory(**kwargs: Any) -> RunImage:
            nonlocal counter
            counter += 1
            workdir = Path(tmp) / f"image-{counter}"
            workdir.mkdir()
            return build_run_image(workdir, base=base, **kwargs)

        yield factory


@pytest.fixture(scope="session")
def vm_image(vm_image_factory: Callable[..., RunImage]) -> RunImage:
    """The plain run image: base + this checkout + the test runner."""
    return vm_image_factory()


@pytest.fixture
def vm_machine(vm_image: RunImage, tmp_path: Path) -> Iterator[Callable[..., Machine]]:
    """Make machines on the plain image (``factory(**Machine kwargs)``); all killed afterwards."""
    machines: list[Machine] = []

    def factory(image: RunImage | None = None, **kwargs: Any) -> Machine:
        machine = Machine(image or vm_image, tmp_path / f"machine-{len(machines) + 1}", **kwargs)
        machines.append(machine)
        return machine

    try:
        yield factory
    finally:
        for machine in machines:
            machine.kill()
