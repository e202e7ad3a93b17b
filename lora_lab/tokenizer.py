"""Character-level tokenizer of the shipped model, and a thin wrapper for transformers ones.

Both offer the same two methods the training loop needs: ``encode(str) -> list[int]`` and
``decode(list[int]) -> str``.
"""

import string

# The fixed vocabulary: newline (ends every answer), space, letters, digits, punctuation.
VOCAB = "\n " + string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation


class CharTokenizer:
    """One token per character of ``VOCAB`` (96 tokens); anything else is an error."""

    EOS_ID = 0  # "\n": every task answer ends with it, and generation can stop there

    def __init__(self):
        self.vocab = VOCAB
        self.vocab_size = len(VOCAB)
        self.stoi = {ch: i for i, ch in enumerate(VOCAB)}
        self.eos_id = self.EOS_ID

    def encode(self, text):
        """str -> list of token ids; characters outside the vocabulary raise ValueError."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return [self.stoi[ch] for ch in text]
        except KeyError:
            bad = sorted({ch for ch in text if ch not in self.stoi})
            raise ValueError(
                f"text has characters outside the vocabulary: {bad!r} (the vocabulary is "
                "newline, space, ASCII letters, digits and punctuation)"
            ) from None

    def decode(self, ids):
        """list of token ids (or a 1-D tensor) -> str."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        bad = [
            i
            for i in ids
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size
        ]
        if bad:
            raise ValueError(f"ids must be ints in [0, {self.vocab_size}), got {bad[:5]!r}")
        return "".join(self.vocab[i] for i in ids)

    def to_transformers(self):
        """The same tokenizer as a transformers ``PreTrainedTokenizerFast`` (for save_pretrained).

        It is a byte-pair model with no merges, so every character is its own token.
        """
        from tokenizers import Tokenizer, decoders, models
        from transformers import PreTrainedTokenizerFast

        core = Tokenizer(models.BPE(vocab=dict(self.stoi), merges=[]))
        core.decoder = decoders.Fuse()  # join characters back with nothing between them
        return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="\n")

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class HFTokenizer:
    """Wrap a transformers tokenizer so it offers ``encode``/``decode`` without special tokens."""

    def __init__(self, hf_tokenizer):
        if not callable(getattr(hf_tokenizer, "decode", None)):
            raise TypeError(f"hf_tokenizer must be a transformers tokenizer, got {hf_tokenizer!r}")
        self.hf_tokenizer = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)
        self.eos_id = hf_tokenizer.eos_token_id

    def encode(self, text):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.hf_tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids):
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self.hf_tokenizer.decode(ids, skip_special_tokens=False)

    def __repr__(self):
        return f"HFTokenizer({type(self.hf_tokenizer).__name__}, vocab_size={self.vocab_size})"
