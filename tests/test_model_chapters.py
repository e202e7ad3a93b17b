"""Every chapter that reads the MODEL switch runs end to end on two more architectures.

Each chapter executes with ``LORA_LAB_MODEL`` pointing at a tiny random-weight model built
offline here: a Qwen2 in bf16 (grouped-query attention, tied embeddings) and a GPT-2 in
fp32 (Conv1D projections). Outputs are not compared (a random model says nothing useful);
every cell must run, and the chapter must really have used the model it was given.
"""

import os
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from lora_lab import save_random_model
from lora_lab.hub import MODEL_ENV

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CHAPTERS = sorted(
    p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb") if "chosen_model()" in p.read_text()
)
MODELS = {"qwen2-bf16": ("qwen2", torch.bfloat16), "gpt2-fp32": ("gpt2", torch.float32)}
PROBE = """\
import os
assert MODEL == os.environ["LORA_LAB_MODEL"] and not lora_lab.is_shipped(MODEL), MODEL
"""


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("second-models")
    return {k: save_random_model(arch, root / k, dtype=dt) for k, (arch, dt) in MODELS.items()}


def test_the_model_chapters_are_found():
    assert {"04_lora_in_a_transformer.ipynb", "05_training_with_lora.ipynb"} <= set(CHAPTERS)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_runs_on_a_second_model(models, chapter, model, monkeypatch):
    monkeypatch.setenv(MODEL_ENV, str(models[model]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / chapter, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(nb, timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError naming the cell that failed
    assert os.environ[MODEL_ENV] == str(models[model])
