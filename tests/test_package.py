"""What `pip install` gives a learner on Colab: the package with its model and its results."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_ships_the_checkpoint_and_every_committed_result(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=600,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("lora_lab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [
        p.relative_to(ROOT).as_posix()
        for folder in ("lora_lab/checkpoints", "lora_lab/results")
        for p in sorted((ROOT / folder).iterdir())
        if p.suffix in (".json", ".safetensors")
    ]
    assert "lora_lab/results/ch08_compare.json" in shipped  # chapters 8 and 9 and the claims
    assert "lora_lab/results/ch09_grid.json" in shipped  # page load these two
    missing = [name for name in shipped if name not in names]
    assert not missing, f"the wheel lacks {missing}: see [tool.setuptools.package-data]"
