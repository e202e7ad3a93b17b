"""Chapter 13's exercise checkers: right answers pass, named slips and wrong answers fail.

Expected values are worked out by hand here, not taken from the checkers' own formulas.
"""

import pytest

from lora_lab.checks import ch13 as check

LLAMA_7B = 6_738_415_616  # Llama-2-7B's parameters (its config: 32 blocks, d 4096, 11008, 32000)


def right_slice(batch_size, world_size, rank):
    per = batch_size // world_size
    return slice(rank * per, rank * per + per)


def test_rank_rows():
    assert check.rank_rows(right_slice).correct
    assert not check.rank_rows(lambda batch_size, world_size, rank: slice(rank, rank + 4)).correct
    strided = check.rank_rows(lambda batch_size, world_size, rank: slice(rank, None, world_size))
    assert not strided.correct and "case 1 of 7" in strided.message  # rows 0, 2, 4, 6: not 0-3

    def stub(batch_size, world_size, rank):
        raise NotImplementedError

    assert "No answer yet" in check.rank_rows(stub).message
    assert "No answer yet" in check.rank_rows(None).message


def test_shard_gib():
    assert check.shard_gib(LLAMA_7B * 2 / 8 / 2**30).correct  # 1.569 GiB
    assert check.shard_gib(1.57).correct
    assert not check.shard_gib(3.0).correct
    assert not check.shard_gib("1.57").correct
    assert "No answer yet" in check.shard_gib(None).message


@pytest.mark.parametrize(
    "answer, says",
    [
        (LLAMA_7B * 2 / 2**30, "DDP's replica"),
        (LLAMA_7B * 4 / 8 / 2**30, "not 4"),
        (LLAMA_7B * 2 / 8 / 1e9, "GB (1e9 bytes)"),
    ],
)
def test_shard_gib_names_the_slip(answer, says):
    result = check.shard_gib(answer)
    assert not result.correct and says in result.message


def test_token_weight():
    assert check.token_weight(2).correct
    assert check.token_weight(3, tokens=(20, 60)).correct
    assert not check.token_weight(4).correct
    assert "No answer yet" in check.token_weight(None).message


@pytest.mark.parametrize("answer, says", [(1, "equal weights"), (0.5, "upside down")])
def test_token_weight_names_the_slip(answer, says):
    result = check.token_weight(answer)
    assert not result.correct and says in result.message
