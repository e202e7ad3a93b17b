"""Chapter 11's checkers: the right answers pass, the usual slips fail with a reason."""

import torch

from lora_lab.checks import ch11
from lora_lab.specs import PRESETS


def test_dora_extra_params():
    spec = PRESETS["llama-2-7b"]
    # q_proj and v_proj are 4096 -> 4096 in every one of Llama-2-7B's 32 blocks (no GQA)
    right = spec.num_layers * 2 * spec.hidden_size
    assert ch11.dora_extra_params(right).correct
    assert not ch11.dora_extra_params(None).correct
    one_block = ch11.dora_extra_params(2 * spec.hidden_size)
    assert not one_block.correct and "one block's" in one_block.message
    assert not ch11.dora_extra_params(right + 1).correct
    # down_proj's input is the MLP width: counting inputs is a slip the checker names
    inputs = spec.num_layers * spec.intermediate_size
    slip = ch11.dora_extra_params(inputs, targets=("down_proj",))
    assert not slip.correct and "input features" in slip.message
    assert ch11.dora_extra_params(
        spec.num_layers * spec.hidden_size, targets=("down_proj",)
    ).correct


def test_loraplus_speedup():
    sweep = {1: {"steps_mean": 120.0}, 4: {"steps_mean": 80.0}, 16: {"steps_mean": 60.0}}
    assert ch11.loraplus_speedup(2.0, sweep).correct
    inverse = ch11.loraplus_speedup(0.5, sweep)
    assert not inverse.correct and "inverse" in inverse.message
    assert not ch11.loraplus_speedup(1.5, sweep).correct  # ratio 4's, not the best
    assert not ch11.loraplus_speedup(None, sweep).correct


def right_dora(x, W, b, A, B, m, scaling):
    V = W + scaling * B @ A  # (out, in)
    y = x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T
    return y if b is None else y + b


def test_dora_forward_passes_the_right_answer_and_names_slips():
    assert ch11.dora_forward(right_dora).correct

    def column_norm(x, W, b, A, B, m, scaling):  # the norm over the wrong axis
        V = W + scaling * B @ A
        y = x @ (m[:, None] * V / V.norm(dim=0, keepdim=True)).T
        return y if b is None else y + b

    def norm_of_w_only(x, W, b, A, B, m, scaling):  # normalizes W, not W + sBA
        V = W + scaling * B @ A
        y = x @ (m[:, None] * V / W.norm(dim=1, keepdim=True)).T
        return y if b is None else y + b

    def bias_scaled(x, W, b, A, B, m, scaling):  # the bias inside the rescaling
        V = W + scaling * B @ A
        y = x @ V.T + (0 if b is None else b)
        return y * (m / V.norm(dim=1))

    def ignores_none_bias(x, W, b, A, B, m, scaling):
        V = W + scaling * B @ A
        return x @ (m[:, None] * V / V.norm(dim=1, keepdim=True)).T + b

    for slip in (column_norm, norm_of_w_only, bias_scaled, ignores_none_bias):
        result = ch11.dora_forward(slip)
        assert not result.correct and "case" in result.message, slip.__name__
    assert "case 1 of 4" in ch11.dora_forward(norm_of_w_only).message
    assert "case 3 of 4" in ch11.dora_forward(ignores_none_bias).message  # the bias-free case


def test_dora_forward_cases_come_from_the_package_layer():
    for label, kwargs, expected in ch11._dora_cases():
        torch.testing.assert_close(right_dora(**kwargs), expected, atol=1e-5, rtol=1e-5)
        assert label
