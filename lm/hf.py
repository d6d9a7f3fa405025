"""HuggingFace interop: GPT-2, LLaMA (1/2/3.x), Qwen2 and Mistral checkpoints into an lm workdir,
and back.

    python -m lm.hf import --hf_dir=PATH_OR_HUB_NAME --workdir=OUT [--dtype=float32]
    python -m lm.hf export --workdir=DIR --hf_dir=OUT [--step=N] [--max_shard_size=5GB] [--peft]
    python -m lm.hf import --hf_dir=PEFT_ADAPTER --workdir=OUT --base=BASE_WORKDIR

A LoRA run exports merged (its adapters added to the base's weights), or with --peft as a PEFT
adapter folder; a PEFT adapter folder imports as a LoRA workdir of an lm base (lm/hf_peft.py).

`--hf_dir` is a transformers model folder or a hub name (`gpt2`, `org/name@revision`; lm/hub.py).
Import writes what a run writes, so everything else works unchanged: `config.json` (the full run
config with the architecture), `tokenizer.json` (lm's format; a HuggingFace tokenizer.json, one
converted from GPT-2-era vocab.json + merges.txt, or a sentencepiece model embedded in it) and
`checkpoints/0/params` (orbax, the tree `Transformer.init` makes). Fine-tune it with
`--config.train.init_from=OUT` (or `--config=configs/imported.py:OUT`).

Supported: `GPT2LMHeadModel` (Conv1D weights are [in, out]; the fused c_attn is split into q/k/v),
`LlamaForCausalLM` (grouped-query attention, tied or untied head, optional attention and MLP
biases, rope scaling `linear` or `llama3`), `Qwen2ForCausalLM` (biases on q/k/v alone) and
`MistralForCausalLM` (a sliding window shorter than the context caps the imported context at the
window, within which the window never acts). Anything else, or an option lm's model does not have
(another rope scaling, activation, a separate head dimension...), is refused with an error naming it.
Parameters keep the checkpoint's dtype (bfloat16 stays bfloat16; float16, which lm does not store,
becomes float32) unless `--dtype` says otherwise.

Tensors are read one at a time (safetensors by their header's offsets, ranged reads in a bucket;
torch's mmap for pytorch_model.bin) into preallocated layer-stacked arrays, which orbax then writes
an array at a time: an import holds the parameters plus about their largest stacked array. Export
writes safetensors one tensor at a time (in shards of at most --max_shard_size, with transformers'
index).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import ml_dtypes
import numpy as np
from ml_collections import ConfigDict

from lm import fs, hub
from lm import tokenizer as tokenizers
from lm.config import ConfigError, default_config, validate_rope_scaling
from lm.model import ModelConfig

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
QWEN2, MISTRAL = "Qwen2ForCausalLM", "MistralForCausalLM"
_LLAMA_FAMILY = (LLAMA, QWEN2, MISTRAL)  # one tensor layout; they differ in biases and windows
_MODEL_TYPES = {"gpt2": GPT2, "llama": LLAMA, "qwen2": QWEN2, "mistral": MISTRAL}
_INSTALL = "pip install tokenizers huggingface_hub (or pip install -e '.[hf]')"


def _read_json(path: fs.Path, what: str) -> dict:
    if not fs.is_file(path):
        raise ConfigError(f"{path} does not exist; {what}")
    try:
        return json.loads(fs.read_text(path))
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Architectures: a HuggingFace config.json <-> the model section of an lm config.

_GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
                     "gelu": "gelu_exact"}


def _architecture(hf: dict) -> str:
    names = hf.get("architectures") or []
    for arch in (GPT2, *_LLAMA_FAMILY):
        if arch in names:
            return arch
    if not names and hf.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf["model_type"]]
    named = ", ".join(names) or f"model_type {hf.get('model_type')!r}"
    raise ConfigError(f"config.json: architecture {named} is not supported; lm imports "
                      f"{', '.join((GPT2, *_LLAMA_FAMILY))}")


def _refuse(problems: list[str], arch: str) -> None:
    if problems:
        raise ConfigError(f"config.json: {arch} with {'; '.join(problems)} is not supported by "
                          f"lm's model")


def _model_fields(hf: dict, arch: str) -> dict:
    """The lm `config.model` fields equivalent to a HuggingFace config, or a ConfigError."""
    return _gpt2_fields(hf) if arch == GPT2 else _llama_fields(hf, arch)


def _gpt2_fields(hf: dict) -> dict:
    problems = []
    act = hf.get("activation_function", "gelu_new")
    if act not in _GPT2_ACTIVATIONS:
        problems.append(f"activation_function={act!r} (supported: {', '.join(_GPT2_ACTIVATIONS)})")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if hf.get(key, ok) != ok:
            problems.append(f"{key}={hf[key]}")
    _refuse(problems, GPT2)
    d = hf["n_embd"]
    return dict(vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], num_heads=hf["n_head"],
                num_kv_heads=hf["n_head"], d_model=d, d_ff=hf.get("n_inner") or 4 * d,
                context_length=hf["n_positions"], norm="layernorm",
                norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned",
                mlp=_GPT2_ACTIVATIONS.get(act, "gelu"), use_bias=True,
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)))


def _llama_fields(hf: dict, arch: str) -> dict:
    problems: list[str] = []
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (supported: 'silu')")
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        problems.append(f"head_dim={hf.get('head_dim')} (lm's is hidden_size/num_attention_heads="
                        f"{d / heads:g})")
    if arch == LLAMA and bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        problems.append(f"attention_bias={hf.get('attention_bias')} but mlp_bias="
                        f"{hf.get('mlp_bias')} (lm has biases everywhere, on q/k/v alone, or "
                        f"nowhere)")
    rope = _rope_fields(hf, problems)
    _refuse(problems, arch)
    context = hf.get("max_position_embeddings", 2048)
    window = _sliding_window(hf, arch)
    return dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads, d_model=d,
                d_ff=hf["intermediate_size"], context_length=min(context, window or context),
                norm="rmsnorm", norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope",
                mlp="swiglu", use_bias=arch == LLAMA and bool(hf.get("attention_bias", False)),
                qkv_bias=arch == QWEN2, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                **rope)


def _sliding_window(hf: dict, arch: str) -> int | None:
    """The attention window in use, if any: Mistral's whenever set, Qwen2's when switched on."""
    in_use = {MISTRAL: True, QWEN2: bool(hf.get("use_sliding_window"))}.get(arch, False)
    return hf.get("sliding_window") if in_use else None


def _rope_parameters(hf: dict) -> dict:
    """transformers 5's `rope_parameters`, or 4.x's `rope_theta` and `rope_scaling`."""
    rope = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        rope.update(hf["rope_scaling"])
    rope.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


_ROPE_SCALING = {"default": "none", "linear": "linear", "llama3": "llama3"}


def _rope_fields(hf: dict, problems: list[str]) -> dict:
    rope = _rope_parameters(hf)
    kind = _ROPE_SCALING.get(rope["rope_type"])
    if kind is None:
        problems.append(f"rope scaling {rope['rope_type']!r} (supported: "
                        f"{', '.join(_ROPE_SCALING)})")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1")
    fields = dict(rope_theta=float(rope["rope_theta"]), rope_scaling=kind or "none")
    try:
        if kind in ("linear", "llama3"):
            fields["rope_scaling_factor"] = float(rope["factor"])
        if kind == "llama3":
            fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]),
                          rope_original_context=int(rope["original_max_position_embeddings"]))
    except KeyError as e:
        problems.append(f"rope scaling {kind!r} without {e.args[0]!r}")
    return fields


def _export_architecture(cfg: ModelConfig) -> str:
    gpt2 = dict(position="learned", norm="layernorm", use_bias=True, mlp=("gelu", "gelu_exact"),
                num_kv_heads=cfg.num_heads)
    llama = dict(position="rope", norm="rmsnorm", mlp=("swiglu",), use_bias=(True, False),
                 qkv_bias=(False, cfg.use_bias))  # q/k/v biases alone are Qwen2's
    qwen2 = dict(position="rope", norm="rmsnorm", mlp=("swiglu",), use_bias=False, qkv_bias=True)
    for arch, wanted in ((GPT2, gpt2), (LLAMA, llama), (QWEN2, qwen2)):
        if all(getattr(cfg, k) in (v if isinstance(v, tuple) else (v,)) for k, v in wanted.items()):
            return arch
    raise ConfigError(
        f"this model (position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias="
        f"{cfg.use_bias}, num_kv_heads={cfg.num_kv_heads} of {cfg.num_heads}) maps onto neither "
        f"{GPT2} (learned positions, layernorm with biases, gelu, multi-head) nor {LLAMA} or "
        f"{QWEN2} (rope, rmsnorm, swiglu)")


def _hf_rope(cfg: ModelConfig) -> dict:
    rope = {"rope_type": {"none": "default"}.get(cfg.rope_scaling, cfg.rope_scaling),
            "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling != "none":
        rope["factor"] = cfg.rope_scaling_factor
    if cfg.rope_scaling == "llama3":
        rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_context)
    return rope


def _hf_config(cfg: ModelConfig, arch: str, tok: Any) -> dict:
    special = {}
    for key in ("bos", "eos", "pad"):
        value = getattr(tok, f"{key}_id", -1) if tok is not None else -1
        # None overrides the transformers class's default (GPT-2's is 50256)
        ok = value is not None and 0 <= value < cfg.vocab_size
        special[f"{key}_token_id"] = int(value) if ok else None
    if arch == GPT2:
        hf = dict(architectures=[GPT2], model_type="gpt2", vocab_size=cfg.vocab_size,
                  n_positions=cfg.context_length, n_embd=cfg.d_model, n_layer=cfg.num_layers,
                  n_head=cfg.num_heads, n_inner=cfg.d_ff,
                  activation_function="gelu_new" if cfg.mlp == "gelu" else "gelu",
                  layer_norm_epsilon=cfg.norm_eps, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                  attn_pdrop=cfg.dropout, initializer_range=cfg.init_std, scale_attn_weights=True,
                  tie_word_embeddings=cfg.tie_embeddings)
    else:
        rope = _hf_rope(cfg)
        hf = dict(architectures=[arch], model_type={LLAMA: "llama", QWEN2: "qwen2"}[arch],
                  vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                  max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
                  # transformers 5 reads rope_parameters; 4.x rope_theta and rope_scaling
                  rope_theta=cfg.rope_theta, rope_parameters=rope,
                  rope_scaling=({**rope, "type": rope["rope_type"]}
                                if cfg.rope_scaling != "none" else None),
                  attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
                  tie_word_embeddings=cfg.tie_embeddings)
        if arch == LLAMA:
            hf.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
    return {**hf, **special, "dtype": cfg.param_dtype, "use_cache": True}


# ---------------------------------------------------------------------------------------------
# Tensors: each HuggingFace tensor <-> one or more lm parameters (per layer where "{i}" appears).

@dataclasses.dataclass(frozen=True)
class _Rule:
    hf: str                                   # HuggingFace name; "{i}" stands for the layer
    hf_shape: tuple[int, ...]
    lm: tuple[str, ...]                       # lm parameter paths, "/"-joined, inside a block
    to_lm: Callable[[np.ndarray], tuple]      # HF tensor -> lm arrays (one per path)
    to_hf: Callable[..., np.ndarray]          # lm arrays -> HF tensor

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _same(hf: str, shape: tuple[int, ...], lm: str) -> _Rule:
    return _Rule(hf, shape, (lm,), lambda w: (w,), lambda w: w)


def _reshaped(hf: str, shape: tuple[int, ...], lm: str, lm_shape: tuple[int, ...]) -> _Rule:
    return _Rule(hf, shape, (lm,), lambda w: (w.reshape(lm_shape),), lambda w: w.reshape(shape))


def _transposed(hf: str, shape: tuple[int, int], lm: str, lm_shape: tuple[int, ...]) -> _Rule:
    """A torch Linear weight [out, in] <-> an lm kernel [in, *out_dims]."""
    return _Rule(hf, shape, (lm,), lambda w: (w.T.reshape(lm_shape),),
                 lambda w: w.reshape(shape[::-1]).T)


def _rules(arch: str, cfg: ModelConfig) -> list[_Rule]:
    d, heads, kv, hd, ff, vocab = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.d_ff, cfg.vocab_size)
    if arch == GPT2:
        block = "transformer.h.{i}."
        rules = [_same("transformer.wte.weight", (vocab, d), "embed"),
                 _same("transformer.wpe.weight", (cfg.context_length, d), "pos_embed"),
                 _same("transformer.ln_f.weight", (d,), "final_norm/scale"),
                 _same("transformer.ln_f.bias", (d,), "final_norm/bias")]
        for hf_norm, lm_norm in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            rules += [_same(f"{block}{hf_norm}.weight", (d,), f"{lm_norm}/scale"),
                      _same(f"{block}{hf_norm}.bias", (d,), f"{lm_norm}/bias")]
        qkv = ("attn/query", "attn/key", "attn/value")
        rules += [
            _Rule(f"{block}attn.c_attn.weight", (d, 3 * d), tuple(f"{p}/kernel" for p in qkv),
                  lambda w: tuple(x.reshape(d, heads, hd) for x in np.split(w, 3, axis=1)),
                  lambda *ws: np.concatenate([x.reshape(d, d) for x in ws], axis=1)),
            _Rule(f"{block}attn.c_attn.bias", (3 * d,), tuple(f"{p}/bias" for p in qkv),
                  lambda b: tuple(x.reshape(heads, hd) for x in np.split(b, 3)),
                  lambda *bs: np.concatenate([x.reshape(d) for x in bs])),
            _reshaped(f"{block}attn.c_proj.weight", (d, d), "attn/out/kernel", (heads, hd, d)),
            _same(f"{block}attn.c_proj.bias", (d,), "attn/out/bias"),
            _same(f"{block}mlp.c_fc.weight", (d, ff), "mlp/up/kernel"),
            _same(f"{block}mlp.c_fc.bias", (ff,), "mlp/up/bias"),
            _same(f"{block}mlp.c_proj.weight", (ff, d), "mlp/down/kernel"),
            _same(f"{block}mlp.c_proj.bias", (d,), "mlp/down/bias")]
    else:
        block = "model.layers.{i}."
        rules = [_same("model.embed_tokens.weight", (vocab, d), "embed"),
                 _same("model.norm.weight", (d,), "final_norm/scale"),
                 _same(f"{block}input_layernorm.weight", (d,), "attn_norm/scale"),
                 _same(f"{block}post_attention_layernorm.weight", (d,), "mlp_norm/scale")]
        for proj, lm, n in (("q_proj", "query", heads), ("k_proj", "key", kv),
                            ("v_proj", "value", kv)):
            rules.append(_transposed(f"{block}self_attn.{proj}.weight", (n * hd, d),
                                     f"attn/{lm}/kernel", (d, n, hd)))
            if cfg.use_bias or cfg.qkv_bias:
                rules.append(_reshaped(f"{block}self_attn.{proj}.bias", (n * hd,),
                                       f"attn/{lm}/bias", (n, hd)))
        rules.append(_transposed(f"{block}self_attn.o_proj.weight", (d, heads * hd),
                                 "attn/out/kernel", (heads, hd, d)))
        for proj, shape, lm_shape in (("gate_proj", (ff, d), (d, ff)), ("up_proj", (ff, d), (d, ff)),
                                      ("down_proj", (d, ff), (ff, d))):
            rules.append(_transposed(f"{block}mlp.{proj}.weight", shape,
                                     f"mlp/{proj.split('_')[0]}/kernel", lm_shape))
        if cfg.use_bias:
            rules += [_same(f"{block}self_attn.o_proj.bias", (d,), "attn/out/bias"),
                      _same(f"{block}mlp.gate_proj.bias", (ff,), "mlp/gate/bias"),
                      _same(f"{block}mlp.up_proj.bias", (ff,), "mlp/up/bias"),
                      _same(f"{block}mlp.down_proj.bias", (d,), "mlp/down/bias")]
    if not cfg.tie_embeddings:
        rules.append(_transposed("lm_head.weight", (vocab, d), "lm_head/kernel", (d, vocab)))
    return rules


# Tensors a checkpoint may hold that are not parameters (buffers of older versions).
_IGNORED = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)$|.*rotary_emb\.inv_freq$")


def _hf_name(arch: str, name: str) -> str:
    """GPT-2 checkpoints saved from GPT2Model (as the original ones were) lack "transformer."."""
    if arch == GPT2 and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


class _LmParams:
    """The lm parameter tree, addressed by (block path, layer), in the scanned or unrolled layout."""

    def __init__(self, cfg: ModelConfig, arrays: dict):
        self.cfg, self.tree = cfg, arrays

    def _leaf(self, path: str, layer: int | None) -> tuple[dict, str, tuple]:
        keys = path.split("/")
        if layer is not None:
            keys = (["layers"] + keys) if self.cfg.scan_layers else ([f"layers_{layer}"] + keys)
        node = self.tree
        for key in keys[:-1]:
            node = node[key]
        index = (layer,) if layer is not None and self.cfg.scan_layers else ()
        return node, keys[-1], index

    def get(self, path: str, layer: int | None) -> np.ndarray:
        node, key, index = self._leaf(path, layer)
        return np.asarray(node[key][index])

    def set(self, path: str, layer: int | None, value: np.ndarray) -> None:
        node, key, index = self._leaf(path, layer)
        target = node[key]
        if tuple(target[index].shape) != value.shape:
            raise ConfigError(f"internal: lm parameter {path} wants {target[index].shape}, "
                              f"got {value.shape}")
        target[index] = value


def param_shapes(cfg: ModelConfig) -> Any:
    """The model's parameter tree as ShapeDtypeStructs (no compute)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lm.model import Transformer

    tokens = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens))["params"]


# ---------------------------------------------------------------------------------------------
# Reading HuggingFace weights, one tensor at a time.

@dataclasses.dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    file: fs.Path
    load: Callable[[], np.ndarray]


def _weight_files(hf_dir: fs.Path) -> list[fs.Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if fs.is_file(index):
            files = sorted(set(_read_json(index, "").get("weight_map", {}).values()))
            missing = [f for f in files if not fs.is_file(hf_dir / f)]
            if missing:
                raise ConfigError(f"{index} names {missing[0]}, which does not exist "
                                  f"({len(missing)} of {len(files)} shards missing)")
            if not files:
                raise ConfigError(f"{index} has no weight_map")
            return [hf_dir / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if fs.is_file(hf_dir / name):
            return [hf_dir / name]
    raise ConfigError(f"{hf_dir} has no weights: expected model.safetensors, "
                      f"model.safetensors.index.json (sharded) or pytorch_model.bin")


# safetensors' dtype names <-> numpy's (bfloat16 from ml_dtypes, which JAX uses too)
_SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                       "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


_MAX_HEADER = 100 * 2**20  # safetensors' own limit


def _safetensors_header(file: fs.Path) -> tuple[dict, int]:
    """(the header's tensor entries, where the data starts) of a safetensors file: an 8-byte
    little-endian length, then that much JSON naming each tensor's dtype, shape and byte range."""
    try:
        with fs.errors(file), fs.path(file).open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
    except (ValueError, struct.error) as e:
        raise ConfigError(f"{file} is not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def _read_at(f: Any, file: fs.Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]
             ) -> np.ndarray:
    """One tensor's bytes, read straight into a new array (a ranged read from a bucket)."""
    data = np.empty(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, np.uint8)
    f.seek(offset)
    if f.readinto(data) != data.size:
        raise ConfigError(f"{file} ends inside a tensor: a truncated safetensors file")
    return data.view(dtype).reshape(shape)


def _safetensors_tensors(file: fs.Path) -> Iterator[_Tensor]:
    header, start = _safetensors_header(file)
    with fs.errors(file), fs.path(file).open("rb") as f:
        for name, entry in header.items():
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ConfigError(f"{file}: tensor {name} has dtype {entry['dtype']}; lm reads "
                                  f"{', '.join(_SAFETENSORS_DTYPES)}")
            shape, (begin, end) = tuple(entry["shape"]), entry["data_offsets"]
            if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ConfigError(f"{file}: tensor {name}'s byte range does not fit its shape "
                                  f"{list(shape)}")
            yield _Tensor(name, shape, file, lambda dtype=dtype, at=start + begin, shape=shape:
                          _read_at(f, file, at, dtype, shape))


def _torch_tensors(file: fs.Path) -> Iterator[_Tensor]:
    with fs.local_file(file) as local:  # torch memory-maps a local file
        yield from _torch_file_tensors(file, local)


def _torch_file_tensors(file: fs.Path, local: str) -> Iterator[_Tensor]:
    try:
        import torch
    except ImportError:
        raise ConfigError(f"{file} is a PyTorch pickle: reading it needs torch (pip install "
                          f"torch), or convert the checkpoint to safetensors") from None
    try:  # memory-mapped, so tensors are read as they are converted
        state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # the pre-zip format cannot be memory-mapped
            state = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"{file} cannot be read by torch.load ({reason})") from None

    def numpy(t: Any) -> np.ndarray:  # numpy has no bfloat16: its bits, viewed as ml_dtypes'
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    for name, tensor in state.items():
        yield _Tensor(name, tuple(tensor.shape), file, lambda t=tensor: numpy(t))
    del state


def _tensors(files: list[fs.Path]) -> Iterator[_Tensor]:
    for file in files:
        yield from (_safetensors_tensors(file) if file.suffix == ".safetensors"
                    else _torch_tensors(file))


def _checkpoint_dtype(files: list[fs.Path], hf: dict) -> str:
    """The dtype lm keeps the parameters in: bfloat16 when the checkpoint's floating tensors all
    are, else float32 (which holds float16 exactly). safetensors say so in their headers; for
    pickles, config.json's `dtype` (`torch_dtype` before transformers 5) is trusted."""
    if all(f.suffix == ".safetensors" for f in files):
        kinds = {entry["dtype"] for f in files for entry in _safetensors_header(f)[0].values()}
        return "bfloat16" if kinds & set(_SAFETENSORS_DTYPES) == {"BF16"} else "float32"
    return "bfloat16" if hf.get("dtype", hf.get("torch_dtype")) == "bfloat16" else "float32"


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    """np.empty on a 64-byte boundary, which jax.device_put onto the CPU takes without a copy
    (numpy's own buffers sit 16 bytes past one, and the copy would double an import's memory)."""
    size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(size + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + size].view(dtype).reshape(shape)


def _read_params(hf_dir: fs.Path, arch: str, cfg: ModelConfig) -> Any:
    shapes = param_shapes(cfg)
    import jax

    tree = jax.tree.map(lambda s: _aligned_empty(s.shape, s.dtype), shapes)
    params = _LmParams(cfg, tree)
    expected: dict[str, tuple[_Rule, int | None]] = {}
    for rule in _rules(arch, cfg):
        for layer in range(cfg.num_layers) if rule.per_layer else (None,):
            expected[rule.hf.format(i=layer)] = (rule, layer)
    seen: set[str] = set()
    for tensor in _tensors(_weight_files(hf_dir)):
        name = _hf_name(arch, tensor.name)
        if name not in expected:
            if _IGNORED.fullmatch(name) or (name == "lm_head.weight" and cfg.tie_embeddings):
                continue
            raise ConfigError(f"{tensor.file}: unexpected tensor {tensor.name} {list(tensor.shape)} "
                              f"for a {arch} (an option lm does not support?)")
        rule, layer = expected[name]
        if tensor.shape != rule.hf_shape:
            raise ConfigError(f"{tensor.file}: tensor {tensor.name} has shape {list(tensor.shape)}, "
                              f"but config.json implies {list(rule.hf_shape)}")
        for path, array in zip(rule.lm, rule.to_lm(tensor.load())):  # cast as it is stored
            params.set(path, layer, array)
        seen.add(name)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise ConfigError(f"{hf_dir}: {len(missing)} tensors missing from the weights, e.g. "
                          f"{', '.join(missing[:3])}")
    return tree


# ---------------------------------------------------------------------------------------------
# Import.

def _import_tokenizer(hf_dir: fs.Path, source: str | os.PathLike | None) -> Any:
    """The HF folder's tokenizer (tokenizer.json, else GPT-2-era vocab.json + merges.txt, else a
    sentencepiece tokenizer.model), or `source`'s; None when there is none. A HuggingFace one
    encodes prompts as transformers does (tokenizer.HuggingFaceTokenizer.hf_template)."""
    path = fs.path(source) if source else hf_dir
    if fs.is_dir(path):
        if fs.is_file(path / "tokenizer.json") or fs.is_file(path / "merges.txt"):
            return tokenizers.HuggingFaceTokenizer.from_pretrained(path, hf_template=True)
        if fs.is_file(path / "tokenizer.model"):
            return tokenizers.SentencePieceTokenizer.from_file(path / "tokenizer.model")
        if source:
            raise ConfigError(f"--tokenizer={source} holds no tokenizer.json, vocab.json + "
                              f"merges.txt, or tokenizer.model")
        return None
    if path.suffix == ".model":
        return tokenizers.SentencePieceTokenizer.from_file(path)
    return tokenizers.load(path)


def local_folder(hf_dir: str | os.PathLike) -> fs.Path:
    """A transformers folder as given (local or in a bucket), or a hub name's snapshot
    (downloaded if need be)."""
    if not fs.is_remote(hf_dir) and hub.is_hub_name(hf_dir):
        return fs.path(hub.download(os.fspath(hf_dir)))
    if not fs.is_dir(hf_dir):
        raise ConfigError(f"--hf_dir={hf_dir} is not a directory nor a hub name (org/name@revision)")
    return fs.path(hf_dir)


PARAM_DTYPES = ("float32", "bfloat16")


def import_checkpoint(hf_dir: str | os.PathLike, workdir: str | os.PathLike, *,
                      tokenizer: str | os.PathLike | None = None, scan_layers: bool = True,
                      dtype: str | None = None) -> ConfigDict:
    """Convert a transformers folder or hub model (`gpt2`, `org/name@revision`) into an lm workdir;
    returns its run config.

    `tokenizer` (a tokenizer.json, a folder, or a sentencepiece .model) replaces the folder's own.
    `dtype` (float32 or bfloat16) stores the parameters so; default: the checkpoint's.
    """
    from lm import checkpoint

    if dtype not in (None, *PARAM_DTYPES):
        raise ConfigError(f"--dtype={dtype} is not one of {', '.join(PARAM_DTYPES)}")
    checkpoint.check_directory(workdir)
    hf_dir, workdir = local_folder(hf_dir), fs.path(workdir)
    hf = _read_json(hf_dir / "config.json",
                    "pass a folder written by transformers' save_pretrained")
    arch = _architecture(hf)
    try:
        fields = _model_fields(hf, arch)
    except KeyError as e:
        raise ConfigError(f"{hf_dir / 'config.json'}: {arch} config lacks {e.args[0]!r}") from None
    checkpoints = workdir / "checkpoints"
    if fs.listdir(checkpoints):
        raise ConfigError(f"{workdir} already has checkpoints; import into a new --workdir")

    config = default_config()
    config.model.update(fields)
    validate_rope_scaling(config.model)
    config.model.param_dtype = dtype or _checkpoint_dtype(_weight_files(hf_dir), hf)
    config.model.scan_layers = scan_layers
    cfg = ModelConfig.from_config(config.model, fields["vocab_size"])
    tok = _import_tokenizer(hf_dir, tokenizer)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                          f"{cfg.vocab_size}; pass the model's own tokenizer")
    params = _read_params(hf_dir, arch, cfg)

    fs.makedirs(workdir)
    if tok is not None:
        tokenizers.save(tok, workdir / "tokenizer.json")
        config.data.tokenizer = os.fspath(fs.absolute(workdir / "tokenizer.json"))
    else:
        config.data.tokenizer = ""  # a run must name one: --config.data.tokenizer=...
    fs.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    _save_params(params, checkpoints)
    return config


_IMPORTED = "hf_import.json"  # written last into a cached import: its presence means complete


def cached_import(name: str, *, log: Callable[[str], None] | None = None) -> Path:
    """The lm workdir of hub model `name` (`gpt2`, `org/name@revision`), imported once per snapshot
    into the lm cache directory (hub.cache_dir()/hf/<org>--<name>/<commit>) and reused after."""
    from filelock import FileLock

    log = log or (lambda message: print(message, file=sys.stderr))
    snapshot = hub.download(name)
    repo, _ = hub.parse(name)
    workdir = hub.cache_dir() / "hf" / repo.replace("/", "--") / snapshot.name
    workdir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(workdir) + ".lock"):  # one process imports; the others wait and reuse it
        if (workdir / _IMPORTED).is_file():
            log(f"{name}: the import in {workdir}")
            return workdir
        if workdir.exists():  # an import that did not finish
            shutil.rmtree(workdir)
        start = time.perf_counter()
        try:
            import_checkpoint(snapshot, workdir)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        (workdir / _IMPORTED).write_text(json.dumps(
            {"repo": repo, "commit": snapshot.name, "snapshot": str(snapshot),
             "seconds": round(seconds, 2)}, indent=2))
        log(f"{name}: imported into {workdir} in {seconds:.1f}s")
    return workdir


_SAVE_IN_FLIGHT_BYTES = 256 * 2**20


def _save_params(params: Any, checkpoints: fs.Path, step: int = 0) -> None:
    """`checkpoints/<step>/params`, written as a run's checkpoint manager writes it (without the
    optimizer and data state, which a run's resume passes over)."""
    import jax
    import orbax.checkpoint as ocp
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    # Bytes in flight to disk: by default orbax stages the whole tree (a second copy of the
    # parameters); it needs room for the largest array.
    in_flight = max([_SAVE_IN_FLIGHT_BYTES] + [x.nbytes for x in jax.tree.leaves(params)])
    handler = ocp.StandardCheckpointHandler(save_concurrent_gb=(in_flight + 2**20) / 1e9)
    try:
        with fs.errors(checkpoints), ocp.CheckpointManager(
                fs.absolute(checkpoints), item_handlers={"params": handler}) as manager:
            # As host jax arrays (sharing aligned numpy buffers): orbax writes them much faster.
            params = jax.device_put(params, jax.devices("cpu")[0])
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
            manager.wait_until_finished()
    finally:
        logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------
# Export.

def _run_model_config(config: ConfigDict, tok: Any) -> ModelConfig:
    if tok is None and not config.model.vocab_size:
        raise ConfigError("the workdir has no tokenizer.json and its config.model.vocab_size "
                          "is 0, so the vocabulary size is unknown")
    return ModelConfig.for_run(config, tok.vocab_size if tok else config.model.vocab_size, 1)


_Entry = tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]  # name, shape, dtype, make


def _nbytes(entry: _Entry) -> int:
    return int(np.prod(entry[1], dtype=np.int64)) * entry[2].itemsize


def _write_safetensors(path: fs.Path, entries: list[_Entry]) -> None:
    """safetensors, written one tensor at a time."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for entry in entries:
        name, shape, dtype, _ = entry
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + _nbytes(entry)]}
        offset += _nbytes(entry)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with fs.errors(path), path.open("wb") as f:  # streamed in parts to a bucket
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype, make in entries:
            array = np.ascontiguousarray(make(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ConfigError(f"internal: {name} has shape {array.shape}, not {shape}")
            f.write(array.reshape(-1).view(np.uint8))


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """Bytes of `5GB`, `500MB`, `2GiB` (transformers' units) or a plain number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
    if match is None or float(match[1]) <= 0:
        raise ConfigError(f"--max_shard_size={size} is not a size such as 5GB, 500MB or 2GiB")
    return int(float(match[1]) * _SIZE_UNITS[(match[2] or "").upper()])


def _shards(entries: list[_Entry], max_bytes: int) -> list[list[_Entry]]:
    """Consecutive tensors, a new shard whenever the next would pass max_bytes (a bigger tensor
    gets a shard of its own), as transformers splits them."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + _nbytes(entry) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += _nbytes(entry)
    return shards


def _write_weights(hf_dir: fs.Path, entries: list[_Entry], max_shard_size: str | int) -> None:
    """model.safetensors, or model-0000i-of-0000N.safetensors shards and the
    model.safetensors.index.json that names each tensor's shard. Weights an earlier export left in
    the folder go first, so that transformers cannot mix them in."""
    for stale in fs.listdir(hf_dir):
        if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json",
                        stale.name):
            fs.remove_tree(stale)
    shards = _shards(entries, parse_size(max_shard_size))
    if len(shards) == 1:
        _write_safetensors(hf_dir / "model.safetensors", entries)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(hf_dir / name, shard)
        weight_map.update({entry[0]: name for entry in shard})
    index = {"metadata": {"total_size": sum(map(_nbytes, entries))}, "weight_map": weight_map}
    fs.write_text(hf_dir / "model.safetensors.index.json", json.dumps(index, indent=2))


EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def export_checkpoint(workdir: str | os.PathLike, hf_dir: str | os.PathLike,
                      step: int | None = None, *,
                      dtype: str | None = None, max_shard_size: str | int = "5GB") -> str:
    """Write a workdir's checkpoint (the latest, or `step`) as a transformers folder that
    `AutoModelForCausalLM.from_pretrained(hf_dir)` loads; returns the architecture's name.

    `dtype` (float32, bfloat16, float16): the weights' dtype; default: the parameters'. Weights
    over `max_shard_size` are split into shards with an index, as transformers writes them.
    """
    from lm import checkpoint

    if dtype not in (None, *EXPORT_DTYPES):
        raise ConfigError(f"--dtype={dtype} is not one of {', '.join(EXPORT_DTYPES)}")
    parse_size(max_shard_size)  # before any work
    workdir, hf_dir = fs.path(workdir), fs.path(hf_dir)
    config = checkpoint.load_run_config(workdir)
    tok = (tokenizers.load(workdir / "tokenizer.json")
           if fs.is_file(workdir / "tokenizer.json") else None)
    cfg = _run_model_config(config, tok)
    arch = _export_architecture(cfg)
    source = workdir if step is None else workdir / "checkpoints" / str(step)
    if step is not None and not fs.is_dir(source):
        raise ConfigError(f"{source} does not exist; --step must name a saved checkpoint")
    # Onto one host device, whatever mesh the run saved from.
    import jax

    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host),
                            param_shapes(cfg))
    if cfg.lora_rank:  # a LoRA run: its base with the adapters merged in
        from lm import lora, lora_base

        params = lora_base.restore(workdir, config.train.init_from,
                                   checkpoint.step_directory(source), abstract)
        cfg, params = lora.merge(cfg, params)
    else:
        params = checkpoint.restore_params(source, abstract)
    params = _LmParams(cfg, jax.tree.map(np.asarray, params))

    name = dtype or cfg.param_dtype
    weights = np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
    entries = []
    for rule in _rules(arch, cfg):
        for layer in range(cfg.num_layers) if rule.per_layer else (None,):
            make = (lambda rule=rule, layer=layer:
                    rule.to_hf(*(params.get(p, layer) for p in rule.lm)))
            entries.append((rule.hf.format(i=layer), rule.hf_shape, weights, make))
    fs.makedirs(hf_dir)
    _write_weights(hf_dir, entries, max_shard_size)
    hf = _hf_config(cfg, arch, tok)
    hf["dtype"] = weights.name
    fs.write_text(hf_dir / "config.json", json.dumps(hf, indent=2))
    generation = {k: v for k, v in hf.items() if k.endswith("_token_id") and v is not None}
    if "eos_token_id" in generation:
        fs.write_text(hf_dir / "generation_config.json", json.dumps(generation, indent=2))
    _export_tokenizer(tok, cfg, hf_dir, chat_template(config, tok))
    return arch


def chat_template(config: ConfigDict, tok: Any) -> str | None:
    """The chat template a run trained with, as transformers must be given it; None for a run that
    neither trained on chats nor has a tokenizer with a template."""
    from lm.chat import ChatTemplate, template_source

    if tok is None or (config.data.format != "chat" and not getattr(tok, "chat_template", None)):
        return None
    return ChatTemplate(template_source(config.data, tok), tok).for_transformers()


def _export_tokenizer(tok: Any, cfg: ModelConfig, hf_dir: fs.Path,
                      template: str | None = None) -> None:
    if isinstance(tok, tokenizers.HuggingFaceTokenizer):
        fs.write_text(hf_dir / "tokenizer.json", tok.spec)
        tokens = {f"{key}_token": tok.id_to_token(getattr(tok, f"{key}_id"))
                  for key in ("bos", "eos", "pad") if getattr(tok, f"{key}_id") >= 0}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
                  "model_max_length": cfg.context_length}
    elif isinstance(tok, tokenizers.SentencePieceTokenizer):
        fs.write_bytes(hf_dir / "tokenizer.model", tok.model_proto)
        sp = tok._sp
        tokens = {f"{key}_token": sp.id_to_piece(getattr(tok, f"{key}_id"))
                  for key in ("bos", "eos", "pad") if getattr(tok, f"{key}_id") >= 0}
        # Whether the model adds sentencepiece's dummy prefix ("▁" before the first word): lm's
        # own models do not, LLaMA's do; transformers must be told.
        first = sp.encode("a")
        prefix = bool(first) and sp.id_to_piece(first[0]).startswith("\u2581")
        config = {"tokenizer_class": "LlamaTokenizer", **tokens, "add_bos_token": False,
                  "add_eos_token": False, "legacy": False, "add_prefix_space": prefix,
                  "model_max_length": cfg.context_length}
    else:
        return
    if template:
        config["chat_template"] = template
    fs.write_text(hf_dir / "tokenizer_config.json", json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str]) -> None:
    """`python -m lm.hf import|export`: the flags `run` defines, to `import_checkpoint` or
    `export_checkpoint`; errors as one line."""
    from absl import flags

    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        sys.exit("error: usage: python -m lm.hf import --hf_dir=PATH_OR_HUB_NAME --workdir=OUT "
                 "[--dtype=D] [--base=WORKDIR] | python -m lm.hf export --workdir=DIR "
                 "--hf_dir=OUT [--step=N] [--dtype=D] [--max_shard_size=5GB] [--peft]")
    try:
        __import__("tokenizers")
    except ImportError:
        sys.exit(f"error: lm.hf needs the `tokenizers` package: {_INSTALL}")
    for name in ("hf_dir", "workdir"):
        if not f[name].value:
            sys.exit(f"error: --{name} is required")
    start = time.perf_counter()
    try:
        if argv[1] == "import" and fs.is_file(fs.path(f.hf_dir) / "adapter_config.json"):
            if not f.base:
                raise ConfigError(f"{f.hf_dir} is a PEFT adapter: pass --base=WORKDIR, the lm "
                                  f"workdir of its base model (e.g. `python -m lm.hf import` of it)")
            from lm.hf_peft import import_adapter

            config = import_adapter(f.hf_dir, f.workdir, f.base)
            print(f"imported the rank-{config.lora.rank} adapter {f.hf_dir} for {f.base} into "
                  f"{f.workdir} in {time.perf_counter() - start:.1f}s; sample with python -m "
                  f"lm.evaluate --workdir={f.workdir} --mode=sample")
        elif argv[1] == "import":
            config = import_checkpoint(f.hf_dir, f.workdir, tokenizer=f.tokenizer, dtype=f.dtype)
            m = config.model
            print(f"imported {f.hf_dir} into {f.workdir} in {time.perf_counter() - start:.1f}s: "
                  f"{m.num_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}, context "
                  f"{m.context_length}, {m.param_dtype}; fine-tune with "
                  f"--config=configs/imported.py:{f.workdir} (or "
                  f"--config.train.init_from={f.workdir})")
            if not config.data.tokenizer:
                print(f"warning: {f.hf_dir} has no tokenizer.json or tokenizer.model; pass "
                      f"--tokenizer=PATH, or set --config.data.tokenizer when training")
            elif tokenizers.load(fs.path(f.workdir) / "tokenizer.json").eos_id < 0:
                print("warning: the tokenizer names no end-of-text token (its tokenizer_config.json "
                      "has no eos_token), which lm's training data needs between documents")
        elif f.peft:
            from lm.hf_peft import export_adapter

            arch = export_adapter(f.workdir, f.hf_dir, f.step)
            print(f"exported the adapters of {f.workdir} as a PEFT adapter for a {arch} into "
                  f"{f.hf_dir} in {time.perf_counter() - start:.1f}s; load it with "
                  f"peft.PeftModel.from_pretrained(base_model, {f.hf_dir!r})")
        else:
            arch = export_checkpoint(f.workdir, f.hf_dir, f.step, dtype=f.dtype,
                                     max_shard_size=f.max_shard_size)
            print(f"exported {f.workdir} as a {arch} into {f.hf_dir} in "
                  f"{time.perf_counter() - start:.1f}s")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # filesystem trouble outside the paths lm checks itself
        sys.exit(f"error: {fs.explain(e, e.filename or f.workdir)}")


def run(argv: list[str] | None = None) -> None:
    """The binary, from Python too: `run(["lm.hf", "import", "--hf_dir=...", "--workdir=..."])`
    (default: sys.argv). Its flags are defined here, not on import, which would clash with an
    importer's own (lm.train's --workdir)."""
    from absl import app, flags, logging

    from lm.config import parse_flags

    flags.DEFINE_string("hf_dir", None, "import: a transformers model folder or a hub name (gpt2, "
                        "org/name@revision); export: the folder written.")
    flags.DEFINE_string("workdir", None, "An lm workdir (import: written; export: read).")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
    flags.DEFINE_string("tokenizer", None, "import: a tokenizer.json, a folder holding one, or a "
                        "sentencepiece .model, when --hf_dir has none (or to replace its own).")
    flags.DEFINE_string("dtype", None, "The parameters' dtype: import float32|bfloat16, export "
                        "float32|bfloat16|float16 (default: as they are).")
    flags.DEFINE_string("max_shard_size", "5GB", "export: weights over this go into shards "
                        "model-0000i-of-0000N.safetensors with an index (e.g. 500MB, 2GiB).")
    flags.DEFINE_bool("peft", False, "export: a LoRA run's adapters alone, as a PEFT adapter "
                      "folder (default: the model with the adapters merged in).")
    flags.DEFINE_string("base", None, "import of a PEFT adapter folder: the lm workdir of its base "
                        "model.")
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
