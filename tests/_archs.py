"""Small random-init Hugging Face architectures (2 layers, hidden 64), built offline from their configs."""
from __future__ import annotations

import torch

VOCAB = 96


def _decoder(cfg_cls, model_cls, tied: bool, **extra):
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tied, **extra)
    return model_cls(cfg)


def build(arch: str, tied: bool) -> torch.nn.Module:
    """A small float model of ``arch`` in eval mode (seeded), its norm weights made non-trivial
    (trained models' are not 1, or 0 for Gemma's ``1 + w``)."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                             tie_word_embeddings=tied))
    elif arch == "llama":
        m = _decoder(tf.LlamaConfig, tf.LlamaForCausalLM, tied)
    elif arch == "qwen2":
        m = _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM, tied)
    elif arch == "gemma2":
        m = _decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, tied, head_dim=16)
    elif arch == "mistral":
        m = _decoder(tf.MistralConfig, tf.MistralForCausalLM, tied)
    elif arch == "phi3":
        m = _decoder(tf.Phi3Config, tf.Phi3ForCausalLM, tied, pad_token_id=0)
    elif arch == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                           num_attention_heads=4, max_position_embeddings=64,
                                           word_embed_proj_dim=64, tie_word_embeddings=tied, pad_token_id=1))
    elif arch == "bert":
        m = tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                             tie_word_embeddings=tied))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1 and ("norm" in n or "ln" in n or "LayerNorm" in n):
                p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


ARCHS = ("gpt2", "llama", "qwen2", "gemma2", "mistral", "phi3", "opt", "bert")
DECODERS = tuple(a for a in ARCHS if a != "bert")


def batches(n: int = 2, length: int = 12) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, VOCAB, (2, length), generator=g)} for _ in range(n)]
