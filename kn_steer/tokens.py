"""One tokenization convention for localization, evaluation, A/B offline runs and serving.

A *prompt* is tokenized the way vLLM tokenizes a text prompt on ``/v1/completions`` and in
``LLM.generate``: with the tokenizer's special tokens (``add_special_tokens=True``), so a model
whose tokenizer adds ``<bos>`` (Gemma, Llama 3) gets it first everywhere. A *continuation* (a
target answer, a multiple-choice option) is the text that follows a prompt: no special tokens.
Scoring ``prompt + continuation`` therefore uses ``prompt_ids(p) + continuation_ids(c)``, the
same ids a server sees when the client sends them as token ids.
"""

from __future__ import annotations

from typing import Any

from kn_steer.errors import DataError


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of a prompt as the model sees it at inference (special tokens included)."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if not ids or not text:
        raise DataError(f"prompt {text!r} tokenizes to nothing")
    return ids


def continuation_ids(tokenizer: Any, text: str) -> list[int]:
    """Ids of a continuation of a prompt (no special tokens); at least one token."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise DataError(f"continuation {text!r} tokenizes to no token")
    return ids


def leading_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens a prompt starts with at inference (``<bos>`` where the model wants it,
    nothing for SmolLM2): what comes before text assembled from continuation ids."""
    full, text = prompt_ids(tokenizer, "a"), continuation_ids(tokenizer, "a")
    if full[len(full) - len(text):] != text:
        raise DataError("the tokenizer's special tokens are not a plain prefix of the text's ids")
    return full[:len(full) - len(text)]


def pad_id(tokenizer: Any) -> int:
    """The id used for padding (never attended to): the tokenizer's pad, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def chat_prompt(tokenizer: Any, text: str, chat: bool = True) -> str:
    """``text`` as a user turn of the tokenizer's chat template, ready for the assistant's answer
    (what ``/v1/chat/completions`` renders); unchanged when ``chat`` is off or the model has no template."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
