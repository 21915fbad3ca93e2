"""Helpers of the streaming tests (tests/stream)."""
import torch


def meta_model(src):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)))


def shard_bytes(dst) -> dict:
    return {p.name: p.read_bytes() for p in sorted(dst.glob("lowbit-*-of-*.safetensors"))}
