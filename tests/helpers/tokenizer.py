"""A small word-level tokenizer for the tiny models, optionally adding ``<bos>`` like Gemma/Llama.

Built with ``tokenizers`` (no download): every word of :data:`WORDS` is one token, split on
whitespace and punctuation; ids stay below the tiny models' vocabulary of 128.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
WORDS = (
    "the capital of france italy japan spain peru germany is city a official language brazil greece "
    "spanish portuguese italian greek paris rome tokyo madrid lima berlin athens continent kenya "
    "located in europe asia africa america write quote that ends word kings masters no man can serve "
    "two penny wise pound foolish answer question according to context choices : . , \" ' "
    "located belongs part norway"
).split()


def word_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Word-level fast tokenizer; with ``bos`` its post-processor puts ``<bos>`` before every
    sequence encoded with special tokens (and nothing otherwise)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + sorted(set(WORDS)))}
    assert len(vocab) <= 128
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    core.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
