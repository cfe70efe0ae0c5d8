"""Every path sees the same token ids: ``<bos>`` first for Gemma 3, nothing added for SmolLM2.

The paths: :func:`kn_steer.tokens.prompt_ids` on the transformers tokenizer (localization and
evaluation), the server's ``/tokenize`` with ``add_special_tokens=True`` (the A/B offline mode)
and vLLM's own prompt rendering (``LLM.generate`` and ``/v1/completions``). The last two go
through vLLM's renderer, built from the model's config the way an engine builds it, with the
request objects vLLM builds; no engine starts (tokenization happens before the engine).
"""

from __future__ import annotations

import pytest

from kn_steer.models import load_tokenizer, resolve_model
from kn_steer.tokens import continuation_ids, prompt_ids

pytestmark = [pytest.mark.vllm]

TEXTS = ("The capital of France is", "Alan Turing works in the field of", " leading space", "ünïcödé 42")
BOS_FIRST = {"smollm2-135m": None, "gemma3-270m": 2}


@pytest.fixture(scope="module", params=sorted(BOS_FIRST))
def paths(request):
    from vllm.config import ModelConfig, VllmConfig
    from vllm.entrypoints.serve.tokenize.protocol import TokenizeCompletionRequest
    from vllm.inputs import TextPrompt
    from vllm.renderers import renderer_from_config

    ref = resolve_model(request.param)
    config = ModelConfig(model=str(ref.path), dtype="float32", max_model_len=1024)
    renderer = renderer_from_config(VllmConfig(model_config=config))
    hf_tokenizer = load_tokenizer(ref)  # what load_hf_model hands localization and evaluation

    def served(text: str) -> list[int]:  # LLM.generate / /v1/completions with a text prompt
        return renderer.tokenize_prompt(TextPrompt(prompt=text),
                                        renderer.default_cmpl_tok_params)["prompt_token_ids"]

    def tokenize_endpoint(text: str, special: bool) -> list[int]:  # /tokenize, as kn_steer.ab.offline asks
        params = TokenizeCompletionRequest(prompt=text, add_special_tokens=special).build_tok_params(config)
        return renderer.tokenize_prompt(TextPrompt(prompt=text), params)["prompt_token_ids"]

    return request.param, hf_tokenizer, renderer.get_tokenizer(), served, tokenize_endpoint


@pytest.mark.parametrize("text", TEXTS)
def test_four_paths_agree(paths, text: str) -> None:
    name, hf_tokenizer, vllm_tokenizer, served, tokenize_endpoint = paths
    offline = prompt_ids(hf_tokenizer, text)
    assert prompt_ids(vllm_tokenizer, text) == offline  # LLM.get_tokenizer()
    assert tokenize_endpoint(text, True) == offline
    assert served(text) == offline
    bos = BOS_FIRST[name]
    if bos is None:
        assert offline == continuation_ids(hf_tokenizer, text)  # nothing added
    else:
        assert offline[0] == bos and offline.count(bos) == 1
        assert offline[1:] == continuation_ids(hf_tokenizer, text)
    # continuations: no special tokens on either side
    assert tokenize_endpoint(text, False) == continuation_ids(hf_tokenizer, text)
