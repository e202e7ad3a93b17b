"""scripts/gpu_check.py on a machine without CUDA: it says so and measures a small shape."""

import json

import pytest
import torch

from scripts import gpu_check

pytestmark = pytest.mark.slow


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the path of a machine without CUDA")
def test_cpu_path_measures_every_method_as_estimated(tmp_path, capsys):
    out = tmp_path / "result.json"
    assert gpu_check.main(["--out", str(out), "--scratch", str(tmp_path)]) == 0
    assert "No CUDA GPU here" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["cuda"] is False and result["shape"] == "small-llama"
    assert "chapters" not in result  # the chapters run only on a GPU
    rows = {row["method"]: row for row in result["memory"]}
    assert list(rows) == ["full", "lora", "qlora"]
    config = gpu_check._config("small-llama")
    for method, row in rows.items():
        assert "skipped" not in row, row
        est = gpu_check._estimate(method, "small-llama", config)
        # parameters, gradients and AdamW state: chapter 1's estimate to the byte, QLoRA's
        # NF4 weights (bitsandbytes on the CPU) included
        assert row["state_bytes"] == est.total - est.activations
        # saved activations: within a few scalars of the estimate
        assert abs(row["activation_bytes"] - est.activations) <= 16
    assert rows["full"]["state_bytes"] > rows["lora"]["state_bytes"] > rows["qlora"]["state_bytes"]
    assert list(tmp_path.iterdir()) == [out]  # the scratch models are gone
