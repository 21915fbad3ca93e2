"""The model skeleton of a Hugging Face checkpoint: built on ``meta``, cut into *units*.

``config.json`` gives the architecture; ``AutoModelForCausalLM.from_config`` under
``torch.device("meta")`` builds the model without allocating a single weight. The model is then
cut into the units the streaming runner quantizes one at a time, in call order:

* ``head``: everything that runs before the first decoder layer (token and position embeddings,
  rotary tables, the causal mask), run as the real model's own forward with every decoder layer
  replaced by a *recorder* that passes the hidden states through and keeps the keyword arguments
  each layer receives (masks, rotary ``(cos, sin)``, position ids);
* ``layer i``: decoder layer ``i`` (``model.layers.i`` for Llama/Qwen2/Mistral/Gemma/Phi-3,
  ``model.decoder.layers.i`` for OPT, ``transformer.h.i`` for GPT-2), called as the model calls it;
* ``tail``: the final norm and ``lm_head``.

Each unit is a :class:`Shell`: a module whose submodules carry their full names in the model
(``model.layers.3.self_attn.q_proj``), so ``include``/``exclude`` patterns, the checkpoint's tensor
names and ``lb.load`` see the same names as for the whole model.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["Architecture", "ARCHITECTURES", "architecture", "build_skeleton", "Shell", "head_shell", "block_shell",
           "tail_shell", "unit_tensor_names", "recorded"]


@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps its decoder layers and the modules after them."""

    layers: str                  # the nn.ModuleList of decoder layers
    tail: tuple[str, ...]        # modules applied after the last layer, in order (missing ones are skipped)
    layer_returns_tuple: bool = False


_LLAMA = Architecture("model.layers", ("model.norm", "lm_head"))
ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "gemma2": _LLAMA,
    "phi3": _LLAMA,
    "opt": Architecture("model.decoder.layers", ("model.decoder.final_layer_norm", "model.decoder.project_out", "lm_head")),
    "gpt2": Architecture("transformer.h", ("transformer.ln_f", "lm_head")),
}


def architecture(config) -> Architecture:
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ValueError(f"config.json: model_type {kind!r} has no block structure lowbit knows; streaming supports "
                         f"{sorted(ARCHITECTURES)} (quantize other models in memory with lb.recipes.get(name).apply, "
                         "or register the layout in lowbit.stream.skeleton.ARCHITECTURES)")
    return ARCHITECTURES[kind]


def build_skeleton(src: Path):
    """``(config, model on meta, Architecture)`` for the checkpoint directory ``src``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"src: {str(src)!r} has no config.json; pass a Hugging Face model directory")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"src: {str(cfg_path)!r} is not valid JSON ({e})") from e
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"src: {str(cfg_path)!r} names no model_type; it is not a transformers config")
    if raw["model_type"] not in ARCHITECTURES:
        architecture(type("C", (), {"model_type": raw["model_type"]})())   # raises the clear error
    config = AutoConfig.from_pretrained(str(src))
    arch = architecture(config)
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(f"src: {str(cfg_path)!r} ties lm_head to the input embeddings (tie_word_embeddings=true); "
                         "streaming quantizes untied models only so far: quantize this model in memory")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return config, model, arch


def _layers(model: nn.Module, arch: Architecture) -> nn.ModuleList:
    return model.get_submodule(arch.layers)


class Shell(nn.Module):
    """A part of the model under the part's full module names; ``forward`` is the part's call."""

    def __init__(self, modules: dict[str, nn.Module], call) -> None:
        super().__init__()
        for name, m in modules.items():
            parent = self
            *path, last = name.split(".")
            for p in path:
                if p not in parent._modules:
                    parent.add_module(p, nn.Module())
                parent = parent._modules[p]
            parent.add_module(last, m)
        self._call = call

    def forward(self, *args, **kwargs):
        return self._call(self, *args, **kwargs)


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` in the head pass: records its keyword arguments."""

    def __init__(self, index: int, store: dict, returns_tuple: bool) -> None:
        super().__init__()
        self.index, self.store, self.returns_tuple = index, store, returns_tuple

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ValueError("streaming: this architecture passes positional arguments to its decoder layers, "
                             "which lowbit cannot record; quantize it in memory")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        self.store.setdefault("layers", []).append(kwargs)
        if self.index == 0:
            self.store["hidden"] = hidden_states
        return (hidden_states,) if self.returns_tuple else hidden_states


def _fresh_buffers(module: nn.Module, config) -> None:
    """Rebuild on CPU every submodule whose non-persistent buffers are on meta (rotary tables:
    computed at construction, never stored in the checkpoint)."""
    for name, m in list(module.named_modules()):
        if any(isinstance(m._buffers.get(b), torch.Tensor) and m._buffers[b].device.type == "meta"
               for b in getattr(m, "_non_persistent_buffers_set", ())):
            try:
                with torch.device("cpu"):
                    fresh = type(m)(config=config)
            except TypeError as e:
                raise ValueError(f"streaming: cannot rebuild {name} ({type(m).__name__}) off the meta device: {e}") from e
            owner, _, attr = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, attr, fresh)


def head_shell(model: nn.Module, arch: Architecture, config) -> Shell:
    """The head unit: ``shell(input_ids)`` returns layer 0's input; :func:`recorded` the keyword
    arguments each layer received in that call."""
    store: dict = {}
    head = copy.deepcopy(model)
    n = len(_layers(head, arch))
    head.get_submodule(arch.layers.rpartition(".")[0]).__setattr__(
        arch.layers.rpartition(".")[2], nn.ModuleList([_Recorder(i, store, arch.layer_returns_tuple) for i in range(n)]))
    for name in arch.tail:
        owner, _, attr = name.rpartition(".")
        try:
            parent = head.get_submodule(owner) if owner else head
        except AttributeError:
            continue
        if getattr(parent, attr, None) is not None:
            setattr(parent, attr, nn.Identity())
    _fresh_buffers(head, config)

    def call(shell, input_ids):
        real = shell.head_model[0]   # the copy's own model when a transform copied the shell
        st = recorded(shell)
        st.clear()
        real(input_ids=input_ids, use_cache=False)
        return st["hidden"]

    # the head's own modules, under their names (rotary tables etc. included; recorders excluded)
    modules = {name: m for name, m in head.named_children()}
    shell = Shell(modules, call)
    shell.head_model = [head]   # not a submodule (plain list): keeps the real model reachable
    return shell


def recorded(shell: Shell) -> dict:
    """The head shell's record of the last call: ``{"hidden": layer 0's input, "layers": [kwargs per layer]}``."""
    real = shell.head_model[0]
    return next(m for m in real.modules() if isinstance(m, _Recorder)).store


def block_shell(model: nn.Module, arch: Architecture, index: int) -> Shell:
    """Decoder layer ``index`` (still on meta) under its full name; ``shell(**kwargs)`` calls it."""
    name = f"{arch.layers}.{index}"
    block = copy.deepcopy(_layers(model, arch)[index])

    def call(shell, **kwargs):
        out = shell.get_submodule(name)(**kwargs)
        return out[0] if isinstance(out, tuple) else out

    return Shell({name: block}, call)


def tail_shell(model: nn.Module, arch: Architecture) -> Shell:
    """The final norm and ``lm_head``: ``shell(hidden)`` returns the logits."""
    present = []
    for name in arch.tail:
        try:
            m = model.get_submodule(name)
        except AttributeError:
            continue
        if m is not None:
            present.append(name)
    modules = {name: copy.deepcopy(model.get_submodule(name)) for name in present}

    def call(shell, hidden_states):
        for name in present:
            if name == present[-1]:   # as *ForCausalLM.forward calls lm_head: on hidden[:, slice(-logits_to_keep, None)]
                hidden_states = hidden_states[:, slice(0, None), :]
            hidden_states = shell.get_submodule(name)(hidden_states)
        return hidden_states

    return Shell(modules, call)


def unit_tensor_names(shell: nn.Module) -> list[str]:
    """The checkpoint tensors a unit needs: its parameters and persistent buffers still on meta."""
    names = []
    for key, t in shell.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            names.append(key)
    return names
