"""The engine's layers and its independence from the UI, as .importlinter states them: lint-imports must keep every
contract (a layer imports only those below it; studio never imports gradio; no import cycles in a package)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contracts_hold():
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([command, "--config", str(ROOT / ".importlinter")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_nothing_outside_the_family_modules_names_a_component_of_a_family():
    """Family knowledge lives in studio/models/families: no other engine module says "unet", "sdxl" or a second text
    encoder in code (A1111's `unet=` LoRA syntax, LoRA file key formats and comments aside)."""
    allowed = {"studio/a1111/prompts.py", "studio/models/loras.py"}  # A1111's syntax; kohya's key names
    offenders = []
    for path in sorted((ROOT / "studio").rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(("studio/models/families/", "studio/embedded/")) or relative in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(word in code for word in ('"unet"', "'unet'", ".unet.", '"sdxl"', "text_encoder_2")):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
