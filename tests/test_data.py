"""The synthetic world, its corpus and the tasks: deterministic, disjoint, well formed."""

import pytest

from lora_lab.data import (
    ANIMALS,
    ATTRIBUTES,
    TASKS,
    Task,
    get_task,
    plain_answer,
    pretraining_corpus,
    prompt_for,
    world,
)
from lora_lab.model import GPTConfig
from lora_lab.tokenizer import CharTokenizer


def test_same_call_twice_gives_identical_data():
    assert world() == world()
    assert pretraining_corpus(20_000) == pretraining_corpus(20_000)
    assert pretraining_corpus(20_000, seed=1) != pretraining_corpus(20_000, seed=0)
    for name in TASKS:
        assert get_task(name) == get_task(name)


def test_world_is_consistent():
    facts = world()
    assert set(facts) == set(ANIMALS)
    for a, f in facts.items():
        assert set(f) == set(ATTRIBUTES)
        assert f["friend"] != a and facts[f["friend"]]["friend"] == a  # friends come in pairs


def test_corpus_states_every_fact_in_plain_question_form():
    corpus = pretraining_corpus(1_000_000)
    missing = [
        (a, k)
        for a in ANIMALS
        for k in ATTRIBUTES
        if prompt_for(a, k) + plain_answer(a, k) not in corpus
    ]
    assert missing == []


@pytest.mark.parametrize("name", TASKS)
def test_task_splits_are_disjoint_and_fit_the_model(name):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name and task.description
    assert len(task.train) > 0 and len(task.test) > 0
    train_prompts = {p for p, _ in task.train}
    assert len(train_prompts) == len(task.train)  # no duplicates either
    assert train_prompts.isdisjoint(p for p, _ in task.test)
    tok, block = CharTokenizer(), GPTConfig().block_size
    for prompt, target in task.train + task.test:
        assert target.endswith("\n") and "\n" not in target[:-1]
        assert len(tok.encode(prompt + target)) - 1 <= block


def test_personas_share_content_but_not_style():
    pirate, butler = get_task("pirate"), get_task("butler")
    assert [p for p, _ in pirate.test] == [p for p, _ in butler.test]
    assert all(a != b for (_, a), (_, b) in zip(pirate.test, butler.test, strict=True))
    facts = world()
    asked = {prompt_for(a, k): (a, k) for a in ANIMALS for k in ATTRIBUTES}
    for task in (pirate, butler):
        for prompt, target in task.train + task.test:  # the answer states the fact asked about
            a, k = asked[prompt]
            assert f"the {a} " in target and f" {facts[a][k]}" in target


@pytest.mark.parametrize("name, lengths", [("reverse", {3, 4, 5, 6}), ("reverse3", {3})])
def test_reverse_targets_are_reversed_prompts(name, lengths):
    task = get_task(name)
    words = []
    for prompt, target in task.train + task.test:
        word = prompt.removeprefix("q: reverse ").removesuffix("\na:")
        assert target == " " + word[::-1] + "\n" and word.isalpha() and word.islower()
        words.append(word)
    assert {len(w) for w in words} == lengths
    assert len(set(words)) == len(words) == 2200  # 2000 train and 200 test, all different


def test_unknown_task_lists_the_tasks():
    with pytest.raises(ValueError, match="unknown task 'pirat'") as err:
        get_task("pirat")
    for name in TASKS:
        assert name in str(err.value)


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_chars must be a positive int"):
        pretraining_corpus(0)
    with pytest.raises(ValueError, match="seed must be an int"):
        pretraining_corpus(10, seed="a")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        get_task("pirate").split("valid")
