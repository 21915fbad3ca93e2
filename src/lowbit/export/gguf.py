"""``lb.export_gguf``: a quantized (or float) model as a GGUF v3 file that llama.cpp runs.

GGUF (ggml ``docs/gguf.md``) is one file: key/value metadata (architecture hyperparameters, the
tokenizer) and named tensors, each of a ggml type. lowbit writes it with the ``gguf`` package (the
``gguf`` extra). What goes where:

* a quantized weight (frozen or not; its codes are ``layer.qweight``) whose grid a GGUF block type
  holds exactly -> that type (``Q4_K``, ``Q4_0`` or ``Q8_0``; :mod:`lowbit.export.gguf_quants`), so
  llama.cpp dequantizes exactly lowbit's weights. Recipes ``gguf-q8_0``, ``gguf-q4_0`` and
  ``gguf-q4_k`` produce such grids (GPTQ/AWQ included);
* any other quantized weight -> its dequantized values as ``F16`` (``float_type``), listed in
  ``GGUFExportInfo.fallback`` with the reason (e.g. a w4g128 grid, rows not a multiple of 32);
* float weights -> ``F16`` (``float_type``), vectors (norms, biases) and BERT's position and
  token-type tables -> ``F32``;
* activation quantizers have no GGUF form (llama.cpp quantizes activations itself): listed in
  ``dropped``.

Architectures (``config.model_type`` of the Hugging Face model inside ``q``): ``bert`` (encoders such
as all-MiniLM-L6-v2, with the sentence-transformers pooling as ``bert.pooling_type``) and ``llama``
(decoders; q/k rows are permuted to llama.cpp's rotary layout, as its converter does). Tensor names
come from ``gguf.get_tensor_name_map``. Anything else raises before a byte is written; the file is
written to a temporary name and renamed (never a partial file).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ..checkpoint.atomic import atomic_file
from ..modules.layer import QuantLayer
from ..modules.quant_weight import QuantWeight
from ..transforms.smooth_quant import SmoothedLinear
from .gguf_quants import gguf_blocks
from .gguf_vocab import vocab_kind, write_vocab

__all__ = ["export_gguf", "GGUFExportInfo", "GGUF_ARCHITECTURES"]

log = logging.getLogger(__name__)

GGUF_ARCHITECTURES = ("bert", "llama")
# llama.cpp adds these to F32 activations directly (ggml_add has no F32 + F16 on CPU): keep them F32
_F32_TENSORS = ("token_types.weight", "position_embd.weight")
_FILE_TYPE = {"Q4_K": "MOSTLY_Q4_K_M", "Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16",
              "F32": "ALL_F32"}


@dataclass
class GGUFExportInfo:
    """What :func:`export_gguf` wrote.

    Attributes:
        path: the file.
        arch: the GGUF architecture.
        tensors: GGUF tensor name -> ggml type (``"Q4_K"``, ``"Q4_0"``, ``"Q8_0"``, ``"F16"``, ``"F32"``).
        fallback: quantized weights written as float (name -> why no block type holds them).
        float_weights: 2-D weights that were float in ``q`` (written as ``float_type``).
        dropped: what ``q`` had that the file does not hold (activation quantizers, unmapped tensors).
        nbytes: file size.
    """

    path: str
    arch: str
    tensors: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    float_weights: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    nbytes: int = 0

    def counts(self) -> dict[str, int]:
        return dict(Counter(self.tensors.values()))

    def summary(self) -> str:
        lines = [f"{self.path}: GGUF {self.arch}, {self.nbytes / 2**20:.1f} MiB, tensors "
                 + ", ".join(f"{k} x{v}" for k, v in sorted(self.counts().items()))]
        lines += [f"  {n}: written as {self.tensors[n]} ({why})" for n, why in self.fallback.items()]
        if self.float_weights:
            lines.append(f"  float in the model, written as float: {', '.join(self.float_weights)}")
        lines += [f"  not in the file: {d}" for d in self.dropped]
        return "\n".join(lines)


def _hf_model(q: nn.Module) -> nn.Module:
    for m in q.modules():
        cfg = getattr(m, "config", None)
        if isinstance(getattr(cfg, "model_type", None), str):
            return m
    raise ValueError("q: no Hugging Face transformers model (a module with config.model_type) inside it; GGUF "
                     f"export writes the architectures {GGUF_ARCHITECTURES}, compressed-tensors any transformers model")


def _pooling(q: nn.Module) -> int:
    """sentence-transformers pooling -> gguf.PoolingType (MEAN when there is no Pooling module)."""
    import gguf

    for m in q.modules():
        if hasattr(m, "pooling_mode_mean_tokens") or hasattr(m, "get_pooling_mode_str"):
            mode = m.get_pooling_mode_str() if hasattr(m, "get_pooling_mode_str") else ""
            if "cls" in mode or getattr(m, "pooling_mode_cls_token", False):
                return gguf.PoolingType.CLS
            if "lasttoken" in mode or getattr(m, "pooling_mode_lasttoken", False):
                return gguf.PoolingType.LAST
            if mode and "mean" not in mode and not getattr(m, "pooling_mode_mean_tokens", False):
                raise ValueError(f"q: sentence-transformers pooling {mode!r} has no llama.cpp pooling type "
                                 "(llama.cpp has mean, cls and last)")
            return gguf.PoolingType.MEAN
    return gguf.PoolingType.MEAN


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    scaling = getattr(cfg, "rope_scaling", None) or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    if kind not in (None, "default"):
        raise ValueError(f"q: rope scaling {kind!r} is not written by lowbit's GGUF export (only plain RoPE)")
    theta = getattr(cfg, "rope_theta", None) or params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _metadata(writer, arch: str, cfg, q: nn.Module) -> None:
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_head_count(int(cfg.num_attention_heads))
    if arch == "bert":
        writer.add_layer_norm_eps(float(cfg.layer_norm_eps))
        writer.add_causal_attention(False)
        writer.add_pooling_type(_pooling(q))
        writer.add_token_type_count(int(getattr(cfg, "type_vocab_size", 1)))
        return
    heads, kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(cfg))
    writer.add_vocab_size(int(cfg.vocab_size))
    if head_dim * heads != cfg.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _rope_perm(rows: int, heads: int) -> np.ndarray:
    """llama.cpp's rotary layout: within each head, rows (pair half, i) -> (i, pair half)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _collect(hf: nn.Module) -> dict[str, object]:
    entries: dict[str, object] = {}
    for name, m in hf.named_modules():
        if isinstance(m, SmoothedLinear):
            raise ValueError(f"q: {name} scales its input by an explicit factor (SmoothQuant/AWQ), which llama.cpp "
                             "cannot hold; fold the factors into norms only (awq(..., explicit=False)); nothing was "
                             "written")
        if isinstance(m, QuantWeight):
            entries[f"{name}.weight" if name else "weight"] = m
    for name, p in hf.named_parameters():
        entries.setdefault(name, p)
    return entries


def _name_map(arch: str, cfg):
    import gguf

    kind = {"bert": gguf.MODEL_ARCH.BERT, "llama": gguf.MODEL_ARCH.LLAMA}[arch]
    tmap = gguf.get_tensor_name_map(kind, int(cfg.num_hidden_layers))

    def name(hf_name: str) -> str | None:
        for cand in (hf_name, "model." + hf_name):
            g = tmap.get_name(cand, try_suffixes=(".weight", ".bias"))
            if g is not None:
                return g
        return None
    return name


def export_gguf(q: nn.Module, path: str | os.PathLike, tokenizer=None, *, float_type: str = "f16",
                name: str | None = None) -> GGUFExportInfo:
    """Write ``q`` (a quantized or float Hugging Face BERT/Llama model, or a sentence-transformers
    model around one) to ``path`` as GGUF v3 for llama.cpp; see the module docstring.

    Args:
        tokenizer: a fast Hugging Face tokenizer (WordPiece or byte-level BPE); default: ``q.tokenizer``
            (sentence-transformers models carry theirs).
        float_type: ``"f16"`` or ``"f32"``: how float 2-D weights (and quantized ones no block type
            holds) are stored; vectors are always F32.
        name: ``general.name`` (default: the config's ``_name_or_path`` or the architecture).

    Returns a :class:`GGUFExportInfo`. Raises ``ValueError`` (nothing written) for an architecture
    llama.cpp's converter does not know here, a tokenizer that cannot be converted, or bad arguments.
    """
    try:
        import gguf
    except ImportError as e:
        raise ImportError("export_gguf needs the 'gguf' package: pip install 'lowbit[gguf]'") from e
    if not isinstance(q, nn.Module):
        raise TypeError(f"q must be a torch.nn.Module, got {type(q).__name__}")
    if float_type not in ("f16", "f32"):
        raise ValueError(f"float_type must be 'f16' or 'f32', got {float_type!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {str(path)!r} is a directory; give a file name such as model.gguf")
    hf = _hf_model(q)
    cfg = hf.config
    arch = cfg.model_type
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"q: architecture {arch!r} is not supported by lowbit's GGUF export (supported: "
                         f"{', '.join(GGUF_ARCHITECTURES)}); nothing was written")
    tokenizer = tokenizer if tokenizer is not None else getattr(q, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("tokenizer: llama.cpp needs the vocabulary; pass tokenizer= (a fast Hugging Face tokenizer)")
    vocab_kind(tokenizer)   # a tokenizer that cannot be converted fails here, before any work
    ftype_np = np.float16 if float_type == "f16" else np.float32
    info = GGUFExportInfo(path=str(path), arch=arch)
    to_gguf = _name_map(arch, cfg)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    tensors: list[tuple[str, np.ndarray, object]] = []
    for hf_name, src in _collect(hf).items():
        gname = to_gguf(hf_name)
        if gname is None:
            info.dropped.append(f"{hf_name} (no llama.cpp tensor for it)")
            continue
        raw = None
        if isinstance(src, QuantWeight):
            if isinstance(src, QuantLayer) and src.input_quant is not None and src.input_quant.enabled:
                info.dropped.append(f"activation quantization of {hf_name.removesuffix('.weight')} (llama.cpp "
                                    "quantizes activations its own way)")
            qt = src.qweight
            typ, out = gguf_blocks(qt) if len(src._weight_shape) == 2 else (None, "not a 2-D weight")
            if typ is None:
                arr = qt.dequantize().reshape(src._weight_shape).numpy().astype(ftype_np)
                info.fallback[gname] = out
            else:
                arr, raw = out, gguf.GGMLQuantizationType[typ]
        else:
            t = src.detach().float().cpu()
            arr = t.numpy().astype(np.float32 if t.dim() <= 1 or gname in _F32_TENSORS else ftype_np)
            if t.dim() >= 2:
                info.float_weights.append(gname)
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")):
            n = heads if ".attn_q." in gname else kv
            arr = arr[_rope_perm(arr.shape[0], n)]
        arr = np.ascontiguousarray(arr)
        tensors.append((gname, arr, raw))
        info.tensors[gname] = raw.name if raw is not None else ("F32" if arr.dtype == np.float32 else "F16")

    quant = Counter(t for t in info.tensors.values() if t in ("Q4_K", "Q4_0", "Q8_0"))
    main = quant.most_common(1)[0][0] if quant else ("F16" if float_type == "f16" else "F32")
    path_name = name or getattr(cfg, "_name_or_path", None) or arch
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_name(str(path_name).rstrip("/").split("/")[-1] or arch)
        _metadata(writer, arch, cfg, q)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPE[main])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        emb = next((a.shape[0] for g, a, r in tensors if g == "token_embd.weight" and r is None), None)
        write_vocab(writer, tokenizer, emb if emb is not None else int(cfg.vocab_size))
        for gname, arr, raw in tensors:
            writer.add_tensor(gname, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    info.nbytes = path.stat().st_size
    log.info("%s", info.summary())
    return info
