"""A SentencePiece tokenizer trained locally, for the tiny presets (pretrained backbones bring their own).

Trained with the sentencepiece library (unigram, byte fallback) and served as a Hugging Face fast tokenizer
built from the trained (piece, score) vocabulary. Why not `T5Tokenizer`: in transformers 5 it ignores a
vocab file without error and hard-codes byte_fallback=False, so characters outside the vocabulary become
<unk> (../shared/notes/cpu-training-facts.md). Here every string round-trips.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable, Sequence

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


def train_tokenizer(texts: Iterable[str], directory: str, vocab_size: int = 2000,
                    extra_symbols: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Train on `texts`, save to `directory` (tokenizer.json + spiece.model) and return the tokenizer.
    `extra_symbols` become single tokens (format markers, image placeholders)."""
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("train_tokenizer needs at least one non-empty text")
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spiece")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, model_type="unigram",
            byte_fallback=True, character_coverage=1.0, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
            bos_id=-1, normalization_rule_name="identity", minloglevel=2, num_threads=1)
        processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
        vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
        with open(prefix + ".model", "rb") as src, open(os.path.join(directory, "spiece.model"), "wb") as dst:
            dst.write(src.read())
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}",
                                                           special_tokens=[(EOS, 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    if extra_symbols:
        tokenizer.add_tokens(list(extra_symbols))
    tokenizer.save_pretrained(directory)
    return tokenizer


def load_tokenizer(directory: str) -> PreTrainedTokenizerFast:
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        raise FileNotFoundError(f"no tokenizer.json in {directory!r}")
    return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
