"""Reading the committed GPU result: present, absent, or damaged."""

import json

import pandas as pd
import pytest

from lora_lab.gpu_results import gpu_check_table, read_gpu_check


def gpu_result(**changes):
    rows = [
        {"method": "full", "estimate_bytes": 60_000_000_000, "lesson_gb": 56,
         "skipped": "estimate 60.0 GB exceeds the GPU's 40.0 GB"},
        {"method": "lora", "estimate_bytes": 15_000_000_000, "lesson_gb": 14,
         "peak_allocated_bytes": 15_300_000_000},
        {"method": "qlora", "estimate_bytes": 5_000_000_000, "lesson_gb": 4,
         "peak_allocated_bytes": 4_900_000_000},
    ]  # fmt: skip
    return {"cuda": True, "device": "NVIDIA A100-SXM4-40GB", "memory": rows, **changes}


def test_absent_file_is_none(tmp_path):
    assert read_gpu_check(tmp_path / "gpu_check.json") is None


def test_table_shows_measurements_and_skips(tmp_path):
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(gpu_result()))
    table = gpu_check_table(read_gpu_check(path))
    assert table.loc["lora", "measured peak (GB)"] == pytest.approx(15.3)
    assert table.loc["qlora", "measured / estimate"] == pytest.approx(0.98)
    assert pd.isna(table.loc["full", "measured peak (GB)"])  # skipped: never estimated instead
    assert "exceeds" in table.loc["full", "note"]


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        (json.dumps(gpu_result(cuda=False)), "not a GPU result"),
        (json.dumps(gpu_result(memory=[])), "must list the methods"),
    ],
)
def test_damaged_file_names_itself(tmp_path, content, match):
    path = tmp_path / "gpu_check.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        read_gpu_check(path)
    assert str(path) in str(err.value)


def test_row_without_measurement_or_reason(tmp_path):
    result = gpu_result()
    del result["memory"][1]["peak_allocated_bytes"]
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(result))
    with pytest.raises(ValueError, match="lora has neither a measurement nor a reason"):
        read_gpu_check(path)
