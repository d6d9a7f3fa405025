"""HuggingFace interop: GPT-2 and LLaMA checkpoints into an lm workdir, and back.

    python -m lm.hf import --hf_dir=PATH --workdir=OUT     # a transformers model folder -> workdir
    python -m lm.hf export --workdir=DIR --hf_dir=OUT      # a workdir's latest (or --step) -> folder

Import writes what a run writes, so everything else works unchanged: `config.json` (the full run
config with the architecture), `tokenizer.json` (lm's format; a HuggingFace tokenizer.json or a
sentencepiece model embedded in it) and `checkpoints/0/params` (orbax, the tree `Transformer.init`
makes). Fine-tune it with `--config.train.init_from=OUT` (or `--config=configs/imported.py:OUT`).

Supported: `GPT2LMHeadModel` (Conv1D weights are [in, out]; the fused c_attn is split into q/k/v)
and `LlamaForCausalLM` (grouped-query attention, tied or untied head, optional attention and MLP
biases). Anything else, or an option lm's model does not have (rope scaling, another activation, a
separate head dimension...), is refused with an error naming it.

Tensors are read one at a time (safetensors' lazy reads, torch's mmap for pytorch_model.bin) into
preallocated layer-stacked arrays, and export writes model.safetensors one tensor at a time, so
neither holds more than the parameters plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from ml_collections import ConfigDict

from lm import tokenizer as tokenizers
from lm.config import ConfigError, default_config, load_run_config
from lm.model import ModelConfig

GPT2, LLAMA = "GPT2LMHeadModel", "LlamaForCausalLM"
_INSTALL = "pip install safetensors tokenizers (or pip install -e '.[hf]')"


def _safetensors():
    try:
        import safetensors
    except ImportError:
        raise ConfigError(f"reading safetensors needs the `safetensors` package: {_INSTALL}") from None
    return safetensors


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; {what}") from None
    except ValueError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Architectures: a HuggingFace config.json <-> the model section of an lm config.

_GPT2_ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",
                     "gelu": "gelu_exact"}


def _architecture(hf: dict) -> str:
    names = hf.get("architectures") or []
    for arch in (GPT2, LLAMA):
        if arch in names:
            return arch
    if not names:
        by_type = {"gpt2": GPT2, "llama": LLAMA}.get(hf.get("model_type"))
        if by_type:
            return by_type
    named = ", ".join(names) or f"model_type {hf.get('model_type')!r}"
    raise ConfigError(f"config.json: architecture {named} is not supported; lm imports "
                      f"{GPT2} and {LLAMA}")


def _refuse(problems: list[str], arch: str) -> None:
    if problems:
        raise ConfigError(f"config.json: {arch} with {'; '.join(problems)} is not supported by "
                          f"lm's model")


def _model_fields(hf: dict, arch: str) -> dict:
    """The lm `config.model` fields equivalent to a HuggingFace config, or a ConfigError."""
    problems = []
    if arch == GPT2:
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            problems.append(f"activation_function={act!r} (supported: "
                            f"{', '.join(_GPT2_ACTIVATIONS)})")
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if hf.get(key, ok) != ok:
                problems.append(f"{key}={hf[key]}")
        _refuse(problems, arch)
        d = hf["n_embd"]
        return dict(vocab_size=hf["vocab_size"], num_layers=hf["n_layer"], num_heads=hf["n_head"],
                    num_kv_heads=hf["n_head"], d_model=d, d_ff=hf.get("n_inner") or 4 * d,
                    context_length=hf["n_positions"], norm="layernorm",
                    norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), position="learned",
                    mlp=_GPT2_ACTIVATIONS.get(act, "gelu"), use_bias=True,
                    tie_embeddings=bool(hf.get("tie_word_embeddings", True)))

    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (supported: 'silu')")
    if hf.get("head_dim") not in (None, d // heads) or d % heads:
        problems.append(f"head_dim={hf.get('head_dim')} (lm's is hidden_size/num_attention_heads="
                        f"{d / heads:g})")
    if bool(hf.get("attention_bias", False)) != bool(hf.get("mlp_bias", False)):
        problems.append(f"attention_bias={hf.get('attention_bias')} but mlp_bias="
                        f"{hf.get('mlp_bias')} (lm has biases everywhere or nowhere)")
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5; 4.x: rope_theta, rope_scaling
    if hf.get("rope_scaling"):
        rope.update(hf["rope_scaling"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        problems.append(f"rope scaling {rope_type!r}")
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append("partial_rotary_factor != 1")
    for key in ("sliding_window", "use_sliding_window"):
        if hf.get(key):
            problems.append(f"{key}={hf[key]}")
    _refuse(problems, arch)
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return dict(vocab_size=hf["vocab_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=kv_heads, d_model=d, d_ff=hf["intermediate_size"],
                context_length=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)), position="rope",
                rope_theta=float(theta), mlp="swiglu", use_bias=bool(hf.get("attention_bias", False)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _export_architecture(cfg: ModelConfig) -> str:
    gpt2 = dict(position="learned", norm="layernorm", use_bias=True, mlp=("gelu", "gelu_exact"),
                num_kv_heads=cfg.num_heads)
    llama = dict(position="rope", norm="rmsnorm", mlp=("swiglu",))
    for arch, wanted in ((GPT2, gpt2), (LLAMA, llama)):
        if all(getattr(cfg, k) in (v if isinstance(v, tuple) else (v,)) for k, v in wanted.items()):
            return arch
    raise ConfigError(
        f"this model (position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}, use_bias="
        f"{cfg.use_bias}, num_kv_heads={cfg.num_kv_heads} of {cfg.num_heads}) maps onto neither "
        f"{GPT2} (learned positions, layernorm with biases, gelu, multi-head) nor {LLAMA} "
        f"(rope, rmsnorm, swiglu)")


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
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        hf = dict(architectures=[LLAMA], model_type="llama", vocab_size=cfg.vocab_size,
                  hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                  max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, rope_parameters=rope, rope_scaling=None,
                  attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias,
                  attention_dropout=cfg.dropout, initializer_range=cfg.init_std,
                  tie_word_embeddings=cfg.tie_embeddings)
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
            if cfg.use_bias:
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
    file: Path
    load: Callable[[], np.ndarray]


def _weight_files(hf_dir: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = hf_dir / index_name
        if index.is_file():
            files = sorted(set(_read_json(index, "").get("weight_map", {}).values()))
            missing = [f for f in files if not (hf_dir / f).is_file()]
            if missing:
                raise ConfigError(f"{index} names {missing[0]}, which does not exist "
                                  f"({len(missing)} of {len(files)} shards missing)")
            if not files:
                raise ConfigError(f"{index} has no weight_map")
            return [hf_dir / f for f in files]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (hf_dir / name).is_file():
            return [hf_dir / name]
    raise ConfigError(f"{hf_dir} has no weights: expected model.safetensors, "
                      f"model.safetensors.index.json (sharded) or pytorch_model.bin")


def _tensors(files: list[Path]) -> Iterator[_Tensor]:
    for file in files:
        if file.suffix == ".safetensors":
            _safetensors()
            from safetensors import safe_open

            try:
                handle = safe_open(str(file), framework="numpy")
            except Exception as e:
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"{file} is not a readable safetensors file ({reason})") from None
            with handle as f:
                for name in f.keys():
                    yield _Tensor(name, tuple(f.get_slice(name).get_shape()), file,
                                  lambda f=f, name=name: f.get_tensor(name))
        else:
            try:
                import torch
            except ImportError:
                raise ConfigError(f"{file} is a PyTorch pickle: reading it needs torch (pip install "
                                  f"torch), or convert the checkpoint to safetensors") from None
            try:  # memory-mapped, so tensors are read as they are converted
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                try:  # the pre-zip format cannot be memory-mapped
                    state = torch.load(file, map_location="cpu", weights_only=True)
                except Exception as e:
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise ConfigError(f"{file} cannot be read by torch.load ({reason})") from None
            for name, tensor in state.items():
                yield _Tensor(name, tuple(tensor.shape), file,
                              lambda t=tensor: t.float().numpy() if t.dtype == torch.bfloat16
                              else t.numpy())
            del state


def _read_params(hf_dir: Path, arch: str, cfg: ModelConfig) -> Any:
    shapes = param_shapes(cfg)
    import jax

    tree = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), shapes)
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
        value = np.asarray(tensor.load()).astype(np.float32, copy=False)
        for path, array in zip(rule.lm, rule.to_lm(value)):
            params.set(path, layer, array)
        seen.add(name)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise ConfigError(f"{hf_dir}: {len(missing)} tensors missing from the weights, e.g. "
                          f"{', '.join(missing[:3])}")
    return tree


# ---------------------------------------------------------------------------------------------
# Import.

def _import_tokenizer(hf_dir: Path, source: str | Path | None) -> Any:
    """The HF folder's tokenizer (tokenizer.json first, else a sentencepiece tokenizer.model), or
    `source`'s; None when there is none."""
    path = Path(source) if source else hf_dir
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return tokenizers.HuggingFaceTokenizer.from_pretrained(path)
        if (path / "tokenizer.model").is_file():
            return tokenizers.SentencePieceTokenizer.from_file(path / "tokenizer.model")
        if source:
            raise ConfigError(f"--tokenizer={source} holds no tokenizer.json or tokenizer.model")
        return None
    if path.suffix == ".model":
        return tokenizers.SentencePieceTokenizer.from_file(path)
    return tokenizers.load(path)


def import_checkpoint(hf_dir: str | Path, workdir: str | Path, *,
                      tokenizer: str | Path | None = None, scan_layers: bool = True) -> ConfigDict:
    """Convert a transformers GPT-2 or LLaMA folder into an lm workdir; returns its run config.

    `tokenizer` (a tokenizer.json, a folder, or a sentencepiece .model) replaces the folder's own.
    """
    hf_dir, workdir = Path(hf_dir), Path(workdir)
    if not hf_dir.is_dir():
        raise ConfigError(f"--hf_dir={hf_dir} is not a directory")
    hf = _read_json(hf_dir / "config.json",
                    "pass a folder written by transformers' save_pretrained")
    arch = _architecture(hf)
    try:
        fields = _model_fields(hf, arch)
    except KeyError as e:
        raise ConfigError(f"{hf_dir / 'config.json'}: {arch} config lacks {e.args[0]!r}") from None
    checkpoints = workdir / "checkpoints"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        raise ConfigError(f"{workdir} already has checkpoints; import into a new --workdir")

    config = default_config()
    config.model.update(fields)
    config.model.scan_layers = scan_layers
    cfg = ModelConfig.from_config(config.model, fields["vocab_size"])
    tok = _import_tokenizer(hf_dir, tokenizer)
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids but the model only "
                          f"{cfg.vocab_size}; pass the model's own tokenizer")
    params = _read_params(hf_dir, arch, cfg)

    workdir.mkdir(parents=True, exist_ok=True)
    if tok is not None:
        tokenizers.save(tok, workdir / "tokenizer.json")
        config.data.tokenizer = str((workdir / "tokenizer.json").resolve())
    else:
        config.data.tokenizer = ""  # a run must name one: --config.data.tokenizer=...
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    _save_params(params, checkpoints)
    return config


def _save_params(params: Any, checkpoints: Path, step: int = 0) -> None:
    """`checkpoints/<step>/params`, written as a run's checkpoint manager writes it (without the
    optimizer and data state, which a run's resume passes over)."""
    import jax
    import orbax.checkpoint as ocp
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        with ocp.CheckpointManager(checkpoints.resolve()) as manager:
            # As host jax arrays (on CPU they share the numpy buffers): orbax writes them ~3x faster.
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


_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...], np.dtype,
                                                        Callable[[], np.ndarray]]]) -> None:
    """safetensors, written one tensor at a time: (name, shape, dtype, make) for each."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, _ in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPES[np.dtype(dtype).name], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype, make in entries:
            array = np.ascontiguousarray(make(), dtype=dtype)
            if array.shape != tuple(shape):
                raise ConfigError(f"internal: {name} has shape {array.shape}, not {shape}")
            f.write(array.reshape(-1).view(np.uint8))


def export_checkpoint(workdir: str | Path, hf_dir: str | Path, step: int | None = None) -> str:
    """Write a workdir's checkpoint (the latest, or `step`) as a transformers folder that
    `AutoModelForCausalLM.from_pretrained(hf_dir)` loads; returns the architecture's name."""
    from lm import checkpoint

    workdir, hf_dir = Path(workdir), Path(hf_dir)
    config = load_run_config(workdir)
    tok = (tokenizers.load(workdir / "tokenizer.json")
           if (workdir / "tokenizer.json").is_file() else None)
    cfg = _run_model_config(config, tok)
    arch = _export_architecture(cfg)
    source = workdir if step is None else workdir / "checkpoints" / str(step)
    if step is not None and not source.is_dir():
        raise ConfigError(f"{source} does not exist; --step must name a saved checkpoint")
    # Onto one host device, whatever mesh the run saved from.
    import jax

    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host),
                            param_shapes(cfg))
    params = _LmParams(cfg, jax.tree.map(np.asarray, checkpoint.restore_params(source, abstract)))

    dtype = np.dtype(cfg.param_dtype if cfg.param_dtype != "bfloat16" else "float32")
    entries = []
    for rule in _rules(arch, cfg):
        for layer in range(cfg.num_layers) if rule.per_layer else (None,):
            make = (lambda rule=rule, layer=layer:
                    rule.to_hf(*(params.get(p, layer) for p in rule.lm)))
            entries.append((rule.hf.format(i=layer), rule.hf_shape, dtype, make))
    hf_dir.mkdir(parents=True, exist_ok=True)
    _write_safetensors(hf_dir / "model.safetensors", entries)
    hf = _hf_config(cfg, arch, tok)
    hf["dtype"] = dtype.name
    (hf_dir / "config.json").write_text(json.dumps(hf, indent=2))
    generation = {k: v for k, v in hf.items() if k.endswith("_token_id") and v is not None}
    if "eos_token_id" in generation:
        (hf_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    _export_tokenizer(tok, cfg, hf_dir)
    return arch


def _export_tokenizer(tok: Any, cfg: ModelConfig, hf_dir: Path) -> None:
    if isinstance(tok, tokenizers.HuggingFaceTokenizer):
        (hf_dir / "tokenizer.json").write_text(tok.spec, encoding="utf-8")
        tokens = {f"{key}_token": tok.id_to_token(getattr(tok, f"{key}_id"))
                  for key in ("bos", "eos", "pad") if getattr(tok, f"{key}_id") >= 0}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
                  "model_max_length": cfg.context_length}
    elif isinstance(tok, tokenizers.SentencePieceTokenizer):
        (hf_dir / "tokenizer.model").write_bytes(tok.model_proto)
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
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# Command line.

def main(argv: list[str]) -> None:
    """`python -m lm.hf import|export`: the flags `run` defines, to `import_checkpoint` or
    `export_checkpoint`; errors as one line."""
    from absl import flags

    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        sys.exit("error: usage: python -m lm.hf import --hf_dir=PATH --workdir=OUT | "
                 "python -m lm.hf export --workdir=DIR --hf_dir=OUT [--step=N]")
    for module in ("safetensors", "tokenizers"):
        try:
            __import__(module)
        except ImportError:
            sys.exit(f"error: lm.hf needs the `{module}` package: {_INSTALL}")
    for name in ("hf_dir", "workdir"):
        if not f[name].value:
            sys.exit(f"error: --{name} is required")
    start = time.perf_counter()
    try:
        if argv[1] == "import":
            config = import_checkpoint(f.hf_dir, f.workdir, tokenizer=f.tokenizer)
            m = config.model
            print(f"imported {f.hf_dir} into {f.workdir} in {time.perf_counter() - start:.1f}s: "
                  f"{m.num_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}; fine-tune "
                  f"with --config=configs/imported.py:{f.workdir} (or "
                  f"--config.train.init_from={f.workdir})")
            if not config.data.tokenizer:
                print(f"warning: {f.hf_dir} has no tokenizer.json or tokenizer.model; pass "
                      f"--tokenizer=PATH, or set --config.data.tokenizer when training")
            elif tokenizers.load(Path(f.workdir) / "tokenizer.json").eos_id < 0:
                print("warning: the tokenizer names no end-of-text token (its tokenizer_config.json "
                      "has no eos_token), which lm's training data needs between documents")
        else:
            arch = export_checkpoint(f.workdir, f.hf_dir, f.step)
            print(f"exported {f.workdir} as a {arch} into {f.hf_dir} in "
                  f"{time.perf_counter() - start:.1f}s")
    except ConfigError as e:
        sys.exit(f"error: {e}")


def run(argv: list[str] | None = None) -> None:
    """The binary, from Python too: `run(["lm.hf", "import", "--hf_dir=...", "--workdir=..."])`
    (default: sys.argv). Its flags are defined here, not on import, which would clash with an
    importer's own (lm.train's --workdir)."""
    from absl import app, flags, logging

    from lm.config import parse_flags

    flags.DEFINE_string("hf_dir", None, "A transformers model folder (import: read; export: "
                        "written).")
    flags.DEFINE_string("workdir", None, "An lm workdir (import: written; export: read).")
    flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest).")
    flags.DEFINE_string("tokenizer", None, "import: a tokenizer.json, a folder holding one, or a "
                        "sentencepiece .model, when --hf_dir has none (or to replace its own).")
    logging.set_verbosity(logging.WARNING)
    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
