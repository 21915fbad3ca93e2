"""Replaying finished blocks: a GPTQ pass reruns only the part of the model it must.

Each GPTQ step runs the calibration batches from the model's input up to the next group of layers
(:mod:`lowbit.gptq.driver`), so without help a model of ``B`` blocks costs about ``B/2`` full
forward passes per block. But once every quantized layer inside a *block* (and every one called
before it) is final, the block's output on a given batch no longer changes: it is recorded the
first time it is computed in that state and, in later passes, the block's forward is replaced by
a replay of the recorded output. A pass then costs the unquantized prefix (embeddings), replays,
and the block holding the current group.

Blocks are found without model-specific names: the outermost children of an ``nn.ModuleList`` or
``nn.Sequential`` whose subtree holds a layer GPTQ quantizes (a transformer's ``encoder.layer.i``,
a CNN's stages). A block output is recorded only when no pending layer has run earlier in the same
forward (its input is then final too), keyed by (batch index, call index within the forward), so a
block called twice per forward is replayed call by call. Outputs are cloned when recorded and
when replayed, so in-place updates downstream cannot corrupt the cache. Training-mode randomness
(dropout) would break replays, which is why the driver runs the model in eval mode.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["find_blocks", "BlockCache"]


def _clone(out):
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


def find_blocks(model: nn.Module, layers: set[nn.Module]) -> list[nn.Module]:
    """The outermost children of ``nn.ModuleList``/``nn.Sequential`` containers that hold one of ``layers``."""
    blocks: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        is_container = isinstance(m, (nn.ModuleList, nn.Sequential))
        for child in m.children():
            if is_container and any(x in layers for x in child.modules()):
                blocks.append(child)
            else:
                visit(child)

    visit(model)
    return blocks


class BlockCache:
    """Records and replays block outputs (see the module docstring).

    ``pending`` is the driver's live set of layers not yet final; ``dirty`` is set by the driver's
    hook when a pending layer runs in the current forward.
    """

    def __init__(self, blocks: list[nn.Module], pending) -> None:
        self.blocks = blocks
        self.pending = pending
        self.inner = {b: [m for m in b.modules()] for b in blocks}
        self.outputs: dict[tuple[int, int, int], object] = {}   # (block index, batch, call) -> output
        self.batch = 0
        self.calls: dict[int, int] = {}
        self.dirty = False
        self.replays = 0

    def new_batch(self, index: int) -> None:
        self.batch, self.calls, self.dirty = index, {}, False

    def _final(self, block: nn.Module) -> bool:
        return not any(m in self.pending for m in self.inner[block])

    def install(self) -> list:
        """Wrap each block's forward for record/replay; returns a handle list for :meth:`remove`."""
        for i, block in enumerate(self.blocks):
            original = block.forward

            def forward(*args, _i=i, _block=block, _orig=original, **kwargs):
                call = self.calls.get(_i, 0)
                self.calls[_i] = call + 1
                key = (_i, self.batch, call)
                hit = self.outputs.get(key)
                if hit is not None:
                    self.replays += 1
                    return _clone(hit)
                clean = not self.dirty
                out = _orig(*args, **kwargs)
                if clean and not self.dirty and self._final(_block):
                    self.outputs[key] = _clone(out)
                return out

            block.forward = forward
        return list(self.blocks)

    def remove(self) -> None:
        for block in self.blocks:
            if "forward" in block.__dict__:
                del block.forward
        self.outputs.clear()
