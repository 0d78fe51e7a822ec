"""Every test here is ``real_cli`` (deselected by default: ``python -m pytest -m real_cli``).

A test names its CLI with ``@pytest.mark.cli("claude")``; it is skipped, saying how to
install it, when that CLI is not installed at its pinned version (``install.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import World
from .install import executable, pins


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.real_cli)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cli(name): the real agent CLI a real_cli test runs")


@pytest.fixture(autouse=True)
def _installed(request: pytest.FixtureRequest) -> None:
    marker = request.node.get_closest_marker("cli")
    if marker is None:
        return
    name = marker.args[0]
    if executable(name) is None:
        version = pins()[name]["version"]
        pytest.skip(
            f"{name} {version} is not installed: run `python tests/real_cli/install.py {name}`"
        )


@pytest.fixture
def make_world(tmp_path: Path) -> Callable[[str], World]:
    """``make_world("claude")``: a fresh repo, vault and HOME for that CLI."""
    count = 0

    def make(cli: str) -> World:
        nonlocal count
        count += 1
        return World(tmp_path / f"world{count}", cli)

    return make
