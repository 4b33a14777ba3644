"""Tests that need a program pip does not install carry a marker that names it (`browser`: Chromium; `postgresql`:
PostgreSQL's initdb and pg_ctl). When the program is missing, such a test is skipped with the reason and the
command that installs it, except in CI, where it fails: CI installs these programs, so there every test must run.
CI is `DIFFUSION_STUDIO_CI=1` (.ci/run sets it) or `CI=true` (set by GitHub Actions, GitLab CI and most others).

tests/conftest.py loads this module as a plugin, so a test file gets the check by using the marker, e.g.
`pytestmark = pytest.mark.browser` for a whole module or `@pytest.mark.postgresql` on one test.
"""

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class SystemTool:
    name: str  # as the reason says it
    commands: tuple[str, ...]  # every one must be on PATH
    install: str  # how to get them

    def missing(self, which: Callable[[str], str | None] = shutil.which) -> list[str]:
        return [command for command in self.commands if which(command) is None]


SYSTEM_TOOLS = {  # marker -> what a test marked with it needs
    "browser": SystemTool("Chromium", ("chromium",), "apt-get install chromium"),
    "postgresql": SystemTool("PostgreSQL's initdb and pg_ctl", ("initdb", "pg_ctl"),
                             "apt-get install postgresql, then put /usr/lib/postgresql/<version>/bin on PATH"),
}


@dataclass(frozen=True)
class MissingTool:
    fail: bool  # in CI: a failure; elsewhere a skip
    reason: str


def running_in_ci(environ: Mapping[str, str]) -> bool:
    return environ.get("DIFFUSION_STUDIO_CI") == "1" or environ.get("CI", "").lower() in ("1", "true")


def check_system_tool(tool: SystemTool, which: Callable[[str], str | None] = shutil.which,
                      environ: Mapping[str, str] = os.environ) -> MissingTool | None:
    """None when the tool's commands are all on PATH; otherwise what to do with the test that needs it."""
    missing = tool.missing(which)
    if not missing:
        return None
    reason = f"needs {tool.name} ({', '.join(missing)} not on PATH): {tool.install}"
    if running_in_ci(environ):
        return MissingTool(fail=True, reason=f"{reason}. CI runs every test, so it must install it (.ci/run does)")
    return MissingTool(fail=False, reason=reason)


def pytest_configure(config):
    for marker, tool in SYSTEM_TOOLS.items():
        config.addinivalue_line("markers", f"{marker}: needs {tool.name} (skipped without it, except in CI)")


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures start anything
def pytest_runtest_setup(item):
    for marker in item.iter_markers():
        tool = SYSTEM_TOOLS.get(marker.name)
        missing = check_system_tool(tool) if tool else None
        if missing and missing.fail:
            pytest.fail(missing.reason, pytrace=False)
        if missing:
            pytest.skip(missing.reason)
