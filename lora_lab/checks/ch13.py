"""Checkers for chapter 13, "Scaling out"."""

from lora_lab.checks import check_function, check_number, named_slip, unanswered


def rank_rows(fn):
    """Exercise 1 (code): ``fn(batch_size, world_size, rank)`` is the slice of rows ``rank`` trains."""
    from lora_lab.finetune import rank_slice

    shapes = [(8, 2, 0), (8, 2, 1), (12, 3, 1), (12, 3, 2), (16, 4, 3), (5, 1, 0), (6, 6, 5)]
    cases = [
        (f"rank {r} of {w}, batch {b}", {"batch_size": b, "world_size": w, "rank": r},
         rank_slice(b, w, r))
        for b, w, r in shapes
    ]  # fmt: skip
    return check_function(
        fn,
        cases,
        what="the rank's slice",
        why="each rank takes the next batch_size // world_size rows, so the ranks together "
        "train on the global batch, in the order one process would.",
    )


def shard_gib(answer, gpus=8, bytes_per_param=2):
    """Exercise 2: GiB of Llama-2-7B's frozen bf16 weights each of ``gpus`` GPUs holds under FSDP."""
    from lora_lab.specs import PRESETS

    n = PRESETS["llama-2-7b"].num_parameters()
    expected = n * bytes_per_param / gpus / 2**30
    if answer is None:
        return unanswered("count the parameters, times 2 bytes (bf16), split evenly over the GPUs")
    slip = named_slip(
        answer,
        expected,
        [
            (n * bytes_per_param / 2**30, "that is the whole model: DDP's replica, not FSDP's shard."),
            (n * 4 / gpus / 2**30, "bf16 is 2 bytes a parameter, not 4."),
            (n * bytes_per_param / gpus / 1e9, "that is in GB (1e9 bytes); the question asks GiB (2**30)."),
        ],
    )  # fmt: skip
    return (
        slip
        if slip is not None
        else check_number(
            answer,
            expected,
            what="GiB per GPU",
            why="FSDP stores 1/N of every sharded parameter on each of N ranks and gathers a block "
            "only while it computes.",
            rel_tol=1e-2,
        )
    )


def token_weight(answer, tokens=(40, 80)):
    """Exercise 3: how many times one of rank 0's target tokens outweighs one of rank 1's when
    DDP averages each rank's own mean loss (``tokens`` target tokens on each rank)."""
    a, b = tokens
    expected = b / a
    if answer is None:
        return unanswered("a rank's mean gives each of its tokens 1/(its tokens); DDP halves that")
    slip = named_slip(
        answer,
        expected,
        [
            (1.0, "equal weights are what the course's scaling gives: sum / global tokens x W."),
            (
                a / b,
                "upside down: the rank with fewer tokens divides by less, so each counts more.",
            ),
        ],
    )
    return (
        slip
        if slip is not None
        else check_number(
            answer,
            expected,
            what="the weight ratio",
            why="averaging per-rank means weighs a token by 1/(W x its rank's tokens); dividing each "
            "rank's sum by the global token count gives every token the same weight.",
        )
    )
