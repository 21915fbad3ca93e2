"""Tiny Hugging Face checkpoints (random init, written shard by shard) for the streaming tests."""
import pytest
import torch

SEQ = 16


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _qwen2_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False)


def _write(config, path, shard: str | None):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    if shard is None:
        model.save_pretrained(path)   # one model.safetensors, no index
    else:
        model.save_pretrained(path, max_shard_size=shard)
    return model


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    model = _write(_llama_config(), path, "150KB")
    return path, model


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    model = _write(_qwen2_config(), path, None)
    return path, model


@pytest.fixture(scope="session")
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (2, SEQ), generator=g)
