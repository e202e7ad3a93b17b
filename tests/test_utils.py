"""lora_lab.utils and the package set-up: OpenMP threads that sleep, seeding without output."""

import os
import subprocess
import sys

import pytest

RECORD = """\
import os, sys
seen = {}
class Finder:  # records the variable at the moment torch is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "torch" not in seen:
            seen["torch"] = os.environ.get("OMP_WAIT_POLICY")
sys.meta_path.insert(0, Finder())
import lora_lab
print(seen.get("torch"), os.environ.get("OMP_WAIT_POLICY"))
"""


def run(env_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_value is not None:
        env["OMP_WAIT_POLICY"] = env_value
    out = subprocess.run([sys.executable, "-c", RECORD], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.slow  # a subprocess or a training run: make test, not make unit
def test_passive_is_set_before_torch_loads():
    assert run(None) == ["PASSIVE", "PASSIVE"]


@pytest.mark.slow  # a subprocess or a training run: make test, not make unit
def test_an_explicit_setting_wins():
    assert run("ACTIVE") == ["ACTIVE", "ACTIVE"]


def test_set_seed_returns_nothing_so_a_chapter_shows_no_stray_output():
    import torch

    from lora_lab import set_seed

    assert set_seed(3) is None
    first = torch.rand(2)
    set_seed(3)
    assert torch.equal(torch.rand(2), first)
