"""train / generate / evaluate on tiny settings, the memory they report, and bad arguments."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from lora_lab.data import TASKS, Task
from lora_lab.measure import measure_state_bytes
from lora_lab.model import GPT, GPTConfig, to_transformers
from lora_lab.tokenizer import CharTokenizer, HFTokenizer
from lora_lab.training import TrainHistory, evaluate, generate, train

WORDS = ("abc", "dog", "sun", "tree", "milk", "fish", "rain", "moon", "star", "leaf")
TINY = Task(
    "tiny",
    "repeat a word",
    train=tuple((f"say {w}:", f" {w}\n") for w in WORDS[:8]),
    test=tuple((f"say {w}:", f" {w}\n") for w in WORDS[8:]),
)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, intermediate_size=64)
    return GPT(config)


def test_loss_goes_down_and_history_is_complete():
    model = tiny_model().eval()
    n = sum(p.numel() for p in model.parameters())
    hist = train(model, TINY, steps=30, lr=1e-2, batch_size=4, progress=False)
    assert isinstance(hist, TrainHistory)
    assert len(hist.loss) == len(hist.step_time) == 30
    assert all(t > 0 for t in hist.step_time) and hist.total_time == sum(hist.step_time)
    assert sum(hist.loss[-5:]) / 5 < 0.5 * sum(hist.loss[:5]) / 5
    assert hist.trainable_params == hist.total_params == n
    mem = hist.memory
    # float32 everywhere: weights and grads are 4 bytes each, AdamW keeps two moments
    assert mem["params"] == mem["grads"] == 4 * n
    n_tensors = len(list(model.parameters()))
    assert mem["optimizer"] == 2 * 4 * n + 4 * n_tensors  # + one float32 step count per tensor
    assert mem["total"] == mem["params"] + mem["grads"] + mem["optimizer"]
    assert mem["peak_rss"] is None or mem["peak_rss"] > mem["total"]
    assert not model.training  # left in the mode it came in


def test_training_is_repeatable_and_seeded():
    runs = [
        train(tiny_model(), TINY, steps=5, lr=1e-2, batch_size=3, progress=False, seed=s).loss
        for s in (0, 0, 1)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_batch_larger_than_the_train_split_repeats_examples():
    hist = train(tiny_model(), TINY, steps=2, lr=1e-2, batch_size=20, progress=False)
    assert len(hist.loss) == 2 and all(x == x for x in hist.loss)  # finite, not NaN


def test_only_trainable_parameters_get_gradients_and_state():
    model = tiny_model()
    for name, p in model.named_parameters():
        p.requires_grad = name == "lm_head.weight"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = train(model, TINY, steps=3, lr=1e-2, batch_size=4, progress=False)
    head = model.lm_head.weight.numel()
    assert hist.trainable_params == head
    assert hist.memory["grads"] == 4 * head
    assert hist.memory["optimizer"] == 2 * 4 * head + 4
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n == "lm_head.weight")


def test_a_memorised_task_is_solved():
    model = tiny_model()
    assert evaluate(model, TINY, split="train") == 0.0
    train(model, TINY, steps=150, lr=1e-2, batch_size=8, progress=False)
    assert evaluate(model, TINY, split="train") == 1.0
    assert generate(model, "say dog:") == " dog\n"


def test_evaluate_equals_exact_match_of_greedy_decoding():
    """Targets built from the model's own greedy output score 1; one changed token scores 0."""
    model = tiny_model(seed=3).eval()
    prompts = [f"say {w}:" for w in WORDS]
    greedy = [generate(model, p, max_new_tokens=6, stop=None) for p in prompts]
    tok = CharTokenizer()
    wrong = [g[:-1] + tok.decode([(tok.encode(g[-1])[0] + 1) % 96]) for g in greedy]
    pairs = tuple(zip(prompts, greedy, strict=True))
    mixed = pairs[:4] + tuple(zip(prompts[4:], wrong[4:], strict=True))
    assert evaluate(model, Task("own", "own greedy output", pairs, pairs), batch_size=3) == 1.0
    assert evaluate(model, Task("mixed", "some wrong", mixed, mixed), batch_size=3) == 0.4
    assert evaluate(model, Task("mixed", "some wrong", mixed, mixed), n=4) == 1.0


def test_generate_greedy_sampling_and_stop():
    model = tiny_model().eval()
    a = generate(model, "say abc:", max_new_tokens=12, stop=None)
    assert len(a) == 12 and a == generate(model, "say abc:", max_new_tokens=12, stop=None)
    hot = [generate(model, "x", 20, temperature=2.0, stop=None, seed=s) for s in (0, 0, 1)]
    assert hot[0] == hot[1] != hot[2]
    out = generate(model, ["a", "b"], max_new_tokens=4, stop=None)
    assert isinstance(out, list) and len(out) == 2


def test_same_training_through_transformers_model():
    """train() takes logits from out.logits: a LlamaForCausalLM copy follows the same path."""
    model = tiny_model()
    hf = to_transformers(model)
    hf_tok = HFTokenizer(CharTokenizer().to_transformers())
    ours = train(model, TINY, steps=4, lr=1e-2, batch_size=4, progress=False)
    theirs = train(hf, TINY, steps=4, lr=1e-2, batch_size=4, tokenizer=hf_tok, progress=False)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        train(hf, TINY, steps=1, lr=1e-2, batch_size=1, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps=0), ValueError, "steps must be an int >= 1, got 0"),
        (dict(steps=2.5), ValueError, "steps must be an int"),
        (dict(lr=0.0), ValueError, "lr must be a finite number > 0"),
        (dict(lr=float("nan")), ValueError, "lr must be a finite number"),
        (dict(batch_size=-1), ValueError, "batch_size must be an int >= 1"),
        (dict(task="nope"), ValueError, "the tasks are " + str(TASKS).replace("(", r"\(")[:10]),
        (dict(task=42), TypeError, "task must be a Task or a task name"),
        (dict(model="gpt"), TypeError, "model must be a torch.nn.Module"),
        (dict(tokenizer=object()), TypeError, r"tokenizer needs encode\(\) and decode\(\)"),
        (dict(grad_clip=0), ValueError, "grad_clip must be a finite number > 0"),
    ],
)
def test_train_rejects_bad_arguments(kwargs, error, match):
    args = dict(model=tiny_model(), task=TINY, steps=1, lr=1e-3, batch_size=2, progress=False)
    with pytest.raises(error, match=match):
        train(**{**args, **kwargs})


def test_other_bad_arguments():
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(ValueError, match="no parameters with requires_grad"):
        train(model, TINY, steps=1, lr=1e-3, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        evaluate(model, TINY, split="dev")
    with pytest.raises(ValueError, match="n=5 is more than the 2 pairs"):
        evaluate(model, TINY, n=5)
    with pytest.raises(ValueError, match="temperature must be"):
        generate(model, "a", temperature=-1.0)
    with pytest.raises(ValueError, match="prompt must be a non-empty str"):
        generate(model, "")
    with pytest.raises(ValueError, match="longer than the model's context"):
        long = Task("long", "too long", (("x" * 40, " y\n"),), (("x", " y\n"),))
        evaluate(model, long, split="train")
    with pytest.raises(TypeError, match="optimizer must be"):
        measure_state_bytes(model, optimizer="adam")
