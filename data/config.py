"""Data configuration: which tokenized datasets to train on and how to batch them."""
from __future__ import annotations

from dataclasses import dataclass, field

from polytron.model.configlib import bad, doc


@dataclass
class DataConfig:
    """Training data: Megatron indexed datasets (or the built-in corpus) and packing."""
    paths: list[str] = field(default_factory=list, metadata=doc(
        "Megatron dataset prefixes (PREFIX.bin / PREFIX.idx). Empty with builtin_corpus=true "
        "uses the corpus built from Python's own documentation."))
    weights: list[float] = field(default_factory=list, metadata=doc(
        "Blend weights, one per path; empty means proportional to dataset size."))
    builtin_corpus: bool = field(default=False, metadata=doc(
        "Build (once, cached) a corpus from the English text shipped with Python: stdlib "
        "docstrings and pydoc_data topics; trains its tokenizer too. No download."))
    tokenizer: str = field(default="", metadata=doc(
        "SentencePiece .model file or Hugging Face tokenizer directory. Empty with "
        "builtin_corpus uses the cached tokenizer trained on that corpus."))
    allow_tokenizer_mismatch: bool = field(default=False, metadata=doc(
        "Train on datasets whose PREFIX.summary.json records another tokenizer fingerprint "
        "than data.tokenizer's (a warning instead of an error). Only for deliberate cases: "
        "token ids of one tokenizer mean other text under another."))
    tokenizer_vocab_size: int = field(default=4096, metadata=doc(
        "Vocabulary of the tokenizer trained for the built-in corpus."))
    cache_dir: str = field(default="~/.cache/polytron", metadata=doc(
        "Where the built-in corpus, its tokenizer and Megatron index caches are kept."))
    seq_len: int = field(default=256, metadata=doc("Tokens per training sample."))
    split: str = field(default="98,1,1", metadata=doc(
        "train,valid,test proportions of each dataset (Megatron's --split)."))
    reset_position_ids: bool = field(default=False, metadata=doc(
        "Restart positions at each end-of-document token inside a packed sample."))
    reset_attention_mask: bool = field(default=False, metadata=doc(
        "Document-level attention masking: tokens attend only within their document."))
    eod_mask_loss: bool = field(default=False, metadata=doc(
        "Exclude the loss where the input token is end-of-document (the prediction across a "
        "document boundary), as Megatron does; predicting the end token itself is still trained."))
    per_source_loss: bool = field(default=True, metadata=doc(
        "With several data.paths, tag each sample with the index of its dataset and log the loss "
        "of each (loss/source<i>, loss_tokens/source<i>: token sums and counts reduced over ranks "
        "separately, so exact under data parallelism). The loss then runs uncompiled."))
    prefetch: int = field(default=2, metadata=doc(
        "Global steps of batches prepared ahead by a background thread (0 disables)."))

    def validate(self) -> None:
        if not self.paths and not self.builtin_corpus:
            raise bad("data.paths", self.paths,
                      "one or more dataset prefixes, or data.builtin_corpus=true")
        if self.weights and len(self.weights) != len(self.paths):
            raise bad("data.weights", self.weights, f"{len(self.paths)} numbers, one per data.paths entry")
        if any(w <= 0 for w in self.weights):
            raise bad("data.weights", self.weights, "positive numbers")
        if self.seq_len <= 0:
            raise bad("data.seq_len", self.seq_len, "a positive integer")
        if self.tokenizer_vocab_size < 256:
            raise bad("data.tokenizer_vocab_size", self.tokenizer_vocab_size, "an integer >= 256")
        parts = self.split.replace("/", ",").split(",")
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            nums = []
        if len(nums) != 3 or any(n < 0 for n in nums) or nums[0] <= 0:
            raise bad("data.split", self.split, "three non-negative numbers 'train,valid,test' with train > 0")
        if self.prefetch < 0:
            raise bad("data.prefetch", self.prefetch, "an integer >= 0")
