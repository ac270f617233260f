"""The README's densify snippet prints no third-party noise (torchao's "Failed to load ... .so",
torch's pytree notes, a "Loading weights" bar), run as a user runs it: a fresh Python process."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

from elsa.model_io.quiet import quiet_loggers

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Failed to load", "is an Enum subclass", "Loading weights")


def _readme_snippet() -> str:
    """The README's Python block that densifies a compressed export."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    return next(block for block in blocks if "load_checkpoint" in block)


def test_readme_densify_snippet_prints_no_third_party_noise(tiny_model_dir, tmp_path):
    from elsa.model_io.export import save_checkpoint
    from elsa.model_io.models import load_model, load_tokenizer

    export = tmp_path / "smollm2-70"
    save_checkpoint(load_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), export, None, "compressed")
    code = _readme_snippet().replace("outputs/", f"{tmp_path}/")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "smollm2-70-dense" / "model.safetensors").exists()
    printed = done.stdout + done.stderr
    assert not [line for line in printed.splitlines() if any(noise in line for noise in NOISE)], printed[-2000:]


def test_quiet_loggers_restores_and_leaves_a_chosen_level_alone():
    unset, chosen = logging.getLogger("elsa-test.unset"), logging.getLogger("elsa-test.chosen")
    chosen.setLevel(logging.DEBUG)
    with quiet_loggers(("elsa-test.unset", "elsa-test.chosen")):
        assert (unset.level, chosen.level) == (logging.ERROR, logging.DEBUG)
    assert (unset.level, chosen.level) == (logging.NOTSET, logging.DEBUG)
