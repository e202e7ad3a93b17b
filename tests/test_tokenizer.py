"""CharTokenizer: round trip, clear errors, and the same ids once exported to transformers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from lora_lab.data import TASKS, get_task, pretraining_corpus
from lora_lab.model import GPTConfig
from lora_lab.tokenizer import VOCAB, CharTokenizer, HFTokenizer


def test_vocabulary_is_fixed_and_matches_the_model():
    tok = CharTokenizer()
    assert tok.vocab_size == len(VOCAB) == len(set(VOCAB)) == GPTConfig().vocab_size
    assert tok.decode([tok.EOS_ID]) == "\n"
    assert tok.encode(VOCAB) == list(range(len(VOCAB)))


@pytest.mark.parametrize("name", TASKS)
def test_round_trip_on_every_task_text(name):
    tok = CharTokenizer()
    task = get_task(name)
    for prompt, target in task.train + task.test:
        for text in (prompt, target):
            assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_corpus_and_tensor_input():
    import torch

    tok = CharTokenizer()
    text = pretraining_corpus(5000, seed=3)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(torch.tensor(ids)) == text


def test_text_outside_vocabulary_names_the_characters():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary") as err:
        tok.encode("caf\u00e9 \u20ac5\tok")
    message = str(err.value)
    for ch in ("\u00e9", "\u20ac", "\\t"):
        assert ch in message


def test_bad_arguments():
    tok = CharTokenizer()
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(["a"])
    with pytest.raises(ValueError, match=r"ids must be ints in \[0, 96\)"):
        tok.decode([1, 96])
    with pytest.raises(ValueError, match="ids must be ints"):
        tok.decode([-1])


def test_transformers_tokenizer_gives_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    tok = CharTokenizer()
    tok.to_transformers().save_pretrained(tmp_path)
    hf = HFTokenizer(AutoTokenizer.from_pretrained(tmp_path))
    text = pretraining_corpus(3000, seed=5) + "Mixed CASE, digits 0123 & {punctuation}!"
    assert hf.encode(text) == tok.encode(text)
    assert hf.decode(hf.encode(text)) == text
    assert hf.eos_id == tok.EOS_ID
