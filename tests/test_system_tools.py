"""A test that needs a program pip does not install is skipped without it, with the reason, except in CI, where it
fails (tests/system_tools.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from system_tools import SYSTEM_TOOLS, check_system_tool

TESTS = Path(__file__).resolve().parent
CHROMIUM, POSTGRESQL = SYSTEM_TOOLS["browser"], SYSTEM_TOOLS["postgresql"]


def which_finds(*commands):
    return lambda command: f"/usr/bin/{command}" if command in commands else None


def test_a_tool_on_the_path_needs_nothing_in_ci_or_not():
    assert check_system_tool(CHROMIUM, which_finds("chromium"), environ={}) is None
    assert check_system_tool(CHROMIUM, which_finds("chromium"), environ={"DIFFUSION_STUDIO_CI": "1"}) is None


def test_a_missing_tool_outside_ci_skips_with_the_reason_and_how_to_install_it():
    missing = check_system_tool(CHROMIUM, which_finds(), environ={"CI": "false"})
    assert not missing.fail
    assert missing.reason == "needs Chromium (chromium not on PATH): apt-get install chromium"


@pytest.mark.parametrize("environ", [{"DIFFUSION_STUDIO_CI": "1"}, {"CI": "true"}, {"CI": "1"}])
def test_a_missing_tool_in_ci_fails(environ):
    missing = check_system_tool(CHROMIUM, which_finds(), environ=environ)
    assert missing.fail
    assert missing.reason.startswith("needs Chromium (chromium not on PATH): apt-get install chromium. CI runs every")


def test_the_reason_names_only_the_commands_that_are_missing():
    missing = check_system_tool(POSTGRESQL, which_finds("initdb"), environ={})
    assert missing.reason.startswith("needs PostgreSQL's initdb and pg_ctl (pg_ctl not on PATH): apt-get install "
                                     "postgresql")


def run_marked_test(tmp_path, path: str, **environ) -> subprocess.CompletedProcess:
    """pytest with the plugin on a module of one `browser` test, with PATH set to `path` and no CI variables but
    those given."""
    (tmp_path / "test_page.py").write_text("import pytest\n\npytestmark = pytest.mark.browser\n\n\n"
                                           "def test_page():\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DIFFUSION_STUDIO_CI")}
    env |= {"PATH": path, "PYTHONPATH": str(TESTS), **environ}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "system_tools", "-p", "no:cacheprovider", "-rs",
                           "test_page.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_marked_test_is_skipped_without_its_tool_and_says_why(tmp_path):
    result = run_marked_test(tmp_path, path=str(tmp_path))
    assert result.returncode == 0, result.stdout
    assert "needs Chromium (chromium not on PATH): apt-get install chromium" in result.stdout  # -rs: the reason
    assert "1 skipped" in result.stdout


def test_a_marked_test_fails_without_its_tool_in_ci(tmp_path):
    result = run_marked_test(tmp_path, path=str(tmp_path), DIFFUSION_STUDIO_CI="1")
    assert result.returncode == 1, result.stdout
    assert "needs Chromium (chromium not on PATH)" in result.stdout
    assert "1 error" in result.stdout


def test_a_marked_test_runs_when_its_tool_is_on_the_path(tmp_path):
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "chromium").write_text("#!/bin/sh\n")
    (bin_folder / "chromium").chmod(0o755)
    result = run_marked_test(tmp_path, path=str(bin_folder), DIFFUSION_STUDIO_CI="1")
    assert result.returncode == 0, result.stdout
    assert "1 passed" in result.stdout
