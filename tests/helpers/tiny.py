"""Tiny random causal LMs, one per supported family (offline tests of every path)."""

from __future__ import annotations

import torch

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, head_dim=16),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=128),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=3,
                num_attention_heads=4, vocab_size=128, word_embed_proj_dim=64, max_position_embeddings=128),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, vocab_size=128, max_position_embeddings=128),
}


def build_tiny_model(family: str, seed: int = 0):
    """A small random causal LM of one family, in float32 eval mode, weights frozen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(TINY_CONFIGS[family])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    return model.eval().requires_grad_(False)


# Small random checkpoints that vLLM can serve (hidden sizes its kernels accept).
SERVING_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "qwen2": dict(model_type="qwen2", hidden_size=128, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "qwen3": dict(model_type="qwen3", hidden_size=128, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, head_dim=32,
                  max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=256),
}


def save_tiny_checkpoint(family: str, folder, seed: int = 0):
    """A small random model with peaked logits (large init), saved as a checkpoint folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SERVING_CONFIGS[family])
    config = AutoConfig.for_model(cfg.pop("model_type"), initializer_range=0.2, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.architectures = [type(model).__name__]
    model.eval().requires_grad_(False)
    model.save_pretrained(folder)
    return model
