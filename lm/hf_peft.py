"""HuggingFace PEFT LoRA adapter folders <-> the adapters of an lm LoRA run.

    python -m lm.hf export --workdir=LORA_RUN --hf_dir=OUT --peft
    python -m lm.hf import --hf_dir=ADAPTER_DIR --workdir=OUT --base=BASE_WORKDIR

An adapter folder is what `PeftModel.save_pretrained` writes: `adapter_config.json` and
`adapter_model.safetensors`, `base_model.model.<module>.lora_A.weight` [rank, fan-in] and
`lora_B.weight` [fan-out, rank] per adapted module. `PeftModel.from_pretrained(base, OUT)` loads an
export onto the transformers model the base was imported from (or `lm.hf export` wrote). lm's
attention has separate query/key/value projections where GPT-2 has one fused `c_attn`: their
adapters export as one of rank (adapted projections) * rank, A stacked and B block-diagonal, and a
fused adapter imports as the same A with B's rows split; both are exact. An import keeps every
module's scale (alpha/rank, or alpha/sqrt(rank) with rsLoRA) by folding its ratio to the run's into
B, and pads lower ranks with zeros: the same function in lm's one rank for all layers.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from lm import fs
from lm import tokenizer as tokenizers
from lm.checkpoint import load_run_config
from lm.config import ConfigError
from lm.hf import (_IMPORTED, GPT2, _Entry, _export_architecture, _LmParams, _read_json,
                   _run_model_config, _save_params, _tensors, _write_safetensors, param_shapes)
from lm.lora import split
from lm.model import ModelConfig

# lm's adapted Dense layers -> the transformers module (and for GPT-2's fused c_attn, which third).
_GPT2_MODULES = {"query": ("attn.c_attn", 0), "key": ("attn.c_attn", 1),
                 "value": ("attn.c_attn", 2), "out": ("attn.c_proj", None),
                 "up": ("mlp.c_fc", None), "down": ("mlp.c_proj", None)}
_LLAMA_MODULES = {"query": ("self_attn.q_proj", None), "key": ("self_attn.k_proj", None),
                  "value": ("self_attn.v_proj", None), "out": ("self_attn.o_proj", None),
                  "gate": ("mlp.gate_proj", None), "up": ("mlp.up_proj", None),
                  "down": ("mlp.down_proj", None)}
_LM_PATHS = {"query": "attn/query", "key": "attn/key", "value": "attn/value", "out": "attn/out",
             "gate": "mlp/gate", "up": "mlp/up", "down": "mlp/down"}


def _modules(arch: str) -> dict[str, tuple[str, int | None]]:
    return _GPT2_MODULES if arch == GPT2 else _LLAMA_MODULES


def _layer_prefix(arch: str) -> str:
    return "base_model.model." + ("transformer.h.{i}." if arch == GPT2 else "model.layers.{i}.")


def _fan(cfg: ModelConfig, target: str) -> tuple[int, int]:
    d, hd = cfg.d_model, cfg.head_dim
    return {"query": (d, cfg.num_heads * hd), "key": (d, cfg.num_kv_heads * hd),
            "value": (d, cfg.num_kv_heads * hd), "out": (cfg.num_heads * hd, d),
            "gate": (d, cfg.d_ff), "up": (d, cfg.d_ff), "down": (cfg.d_ff, d)}[target]


# ---------------------------------------------------------------------------------------------
# Export.

def _module_entries(arch: str, cfg: ModelConfig, adapters: _LmParams, layer: int
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each adapted transformers module of a layer -> (lora_A [r, fan-in], lora_B [fan-out, r])."""
    rank, out = cfg.lora_rank, {}
    for target in cfg.lora_targets:
        module, third = _modules(arch)[target]
        fan_in, fan_out = _fan(cfg, target)
        a = adapters.get(f"{_LM_PATHS[target]}/lora_a", layer).reshape(fan_in, rank).T
        b = adapters.get(f"{_LM_PATHS[target]}/lora_b", layer).reshape(rank, fan_out).T
        if third is None:
            out[module] = (a, b)
            continue
        parts = out.setdefault(module, ([], []))  # fused c_attn: stacked below
        parts[0].append(a)
        parts[1].append((third, b))
    for module, (a, b) in out.items():
        if isinstance(a, list):  # A stacked; B block-diagonal over [q; k; v] rows
            d = cfg.d_model
            fused = np.zeros((3 * d, rank * len(a)), np.float32)
            for j, (third, part) in enumerate(b):
                fused[third * d:(third + 1) * d, j * rank:(j + 1) * rank] = part
            out[module] = (np.concatenate(a), fused)
    return out


def export_adapter(workdir: str | os.PathLike, hf_dir: str | os.PathLike,
                   step: int | None = None, base_model_name_or_path: str | None = None) -> str:
    """Write a LoRA run's adapters (latest checkpoint, or `step`) as a PEFT adapter folder;
    returns the architecture's name."""
    import jax

    from lm import checkpoint, lora_base

    workdir, hf_dir = fs.path(workdir), fs.path(hf_dir)
    config = load_run_config(workdir)
    if not config.lora.rank:
        raise ConfigError(f"{workdir} is not a LoRA run (config.lora.rank=0): it has no adapters "
                          f"to export; export the whole model without --peft")
    tok = (tokenizers.load(workdir / "tokenizer.json")
           if fs.is_file(workdir / "tokenizer.json") else None)
    cfg = _run_model_config(config, tok)
    arch = _export_architecture(cfg)
    source = workdir if step is None else workdir / "checkpoints" / str(step)
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host),
                            split(param_shapes(cfg))[0])
    adapters = _LmParams(cfg, jax.tree.map(np.asarray, checkpoint.restore_params(
        checkpoint.step_directory(source), abstract)))
    entries: list[_Entry] = []
    ranks: dict[str, int] = {}
    for layer in range(cfg.num_layers):
        for module, (a, b) in _module_entries(arch, cfg, adapters, layer).items():
            name = _layer_prefix(arch).format(i=layer) + module
            entries += [(f"{name}.lora_A.weight", a.shape, np.dtype(np.float32), lambda a=a: a),
                        (f"{name}.lora_B.weight", b.shape, np.dtype(np.float32), lambda b=b: b)]
            ranks[module] = a.shape[0]
    fs.makedirs(hf_dir)
    _write_safetensors(hf_dir / "adapter_model.safetensors", entries)
    base = base_model_name_or_path or _base_name(workdir, config, lora_base.BASE_RECORD)
    fs.write_text(hf_dir / "adapter_config.json", json.dumps(
        _adapter_config(cfg, arch, ranks, base), indent=2))
    return arch


def _base_name(workdir: fs.Path, config: ConfigDict, record: str) -> str:
    """What the adapter's base is called: a hub model's name when the base is lm's cached import of
    one (`lm.load("hf:NAME")`, `--hf=NAME`), else the base's lm workdir."""
    base = (json.loads(fs.read_text(workdir / record))["init_from"]
            if fs.is_file(workdir / record) else config.train.init_from)
    imported = fs.path(base) / _IMPORTED
    return json.loads(fs.read_text(imported))["repo"] if fs.is_file(imported) else base


def _adapter_config(cfg: ModelConfig, arch: str, ranks: dict[str, int], base: str) -> dict:
    rank, alpha = cfg.lora_rank, cfg.lora_alpha
    # A fused module of k adapters has rank k*r; alpha k*alpha keeps its scale alpha/r.
    wider = {m: r for m, r in ranks.items() if r != rank}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": rank, "lora_alpha": alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(ranks), "fan_in_fan_out": arch == GPT2, "bias": "none",
            "rank_pattern": wider, "alpha_pattern": {m: alpha * r / rank for m, r in wider.items()},
            "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "init_lora_weights": True, "layers_to_transform": None, "inference_mode": True}


# ---------------------------------------------------------------------------------------------
# Import.

_TENSOR_NAME = re.compile(r"base_model\.model\.(.+)\.lora_([AB])(?:\.[\w-]+)?\.weight")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name's end, as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_supported(spec: dict, where: fs.Path) -> None:
    problems = [f"{key}={spec[key]!r}" for key, fine in (
        ("peft_type", ("LORA",)), ("bias", ("none", None)), ("use_dora", (False, None)),
        ("modules_to_save", (None, [])), ("lora_bias", (False, None)))
        if spec.get(key, fine[-1]) not in fine]
    if problems:
        raise ConfigError(f"{where}: an adapter with {', '.join(problems)} is not supported: lm "
                          f"imports plain LoRA adapters (no DoRA, biases or extra trained modules)")


def _read_adapter(adapter_dir: fs.Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(adapter_config.json, module name -> {"A": .., "B": ..})."""
    spec = _read_json(adapter_dir / "adapter_config.json",
                      "pass a folder PeftModel.save_pretrained wrote")
    _check_supported(spec, adapter_dir / "adapter_config.json")
    files = [adapter_dir / name for name in ("adapter_model.safetensors", "adapter_model.bin")
             if fs.is_file(adapter_dir / name)][:1]
    if not files:
        raise ConfigError(f"{adapter_dir} has no adapter_model.safetensors (or adapter_model.bin)")
    modules: dict[str, dict[str, np.ndarray]] = {}
    for tensor in _tensors(files):
        match = _TENSOR_NAME.fullmatch(tensor.name)
        if match is None:
            raise ConfigError(f"{tensor.file}: unexpected tensor {tensor.name}; lm imports LoRA "
                              f"adapters (base_model.model.<module>.lora_A/lora_B.weight)")
        modules.setdefault(match[1], {})[match[2]] = np.asarray(tensor.load(), np.float32)
    return spec, modules


def _lm_module(arch: str, module: str, num_layers: int) -> tuple[int, str]:
    """(layer, module name within the layer) of an adapted transformers module."""
    prefix = _layer_prefix(arch)[len("base_model.model."):].replace(".", r"\.")
    match = re.fullmatch(prefix.replace("{i}", r"(\d+)") + r"(.+)", module)
    names = {name for name, _ in _modules(arch).values()}
    if match is None or match[2] not in names or int(match[1]) >= num_layers:
        raise ConfigError(f"adapter module {module} is not one lm adapts in a {arch} of "
                          f"{num_layers} layers (lm adapts {', '.join(sorted(names))})")
    return int(match[1]), match[2]


def import_adapter(adapter_dir: str | os.PathLike, workdir: str | os.PathLike,
                   base: str | os.PathLike) -> ConfigDict:
    """An lm LoRA workdir holding a PEFT adapter folder's adapters for `base` (an lm workdir, e.g.
    the import of the adapter's base model); returns its run config."""
    from lm import lora_base

    adapter_dir, workdir, base = fs.path(adapter_dir), fs.path(workdir), fs.path(base)
    spec, modules = _read_adapter(adapter_dir)
    config = load_run_config(base)
    tok = tokenizers.load(base / "tokenizer.json") if fs.is_file(base / "tokenizer.json") else None
    cfg = _run_model_config(config, tok)
    arch = _export_architecture(cfg)
    if fs.listdir(workdir / "checkpoints"):
        raise ConfigError(f"{workdir} already has checkpoints; import into a new --workdir")
    scales, rank = {}, max(m["A"].shape[0] for m in modules.values())
    targets: set[str] = set()
    for module in modules:
        _, name = _lm_module(arch, module, cfg.num_layers)
        r = _pattern_value(spec.get("rank_pattern") or {}, module, spec["r"])
        alpha = _pattern_value(spec.get("alpha_pattern") or {}, module, spec["lora_alpha"])
        scales[module] = alpha / (r ** 0.5 if spec.get("use_rslora") else r)
        targets |= {t for t, (m, _) in _modules(arch).items() if m == name}
    alpha = spec["lora_alpha"] * rank / spec["r"]  # the default modules' scale, at lm's rank
    config.lora.update(rank=rank, alpha=float(alpha), dropout=float(spec.get("lora_dropout", 0.0)),
                       targets=",".join(t for t in _LM_PATHS if t in targets))
    config.train.init_from = os.fspath(fs.absolute(base))
    cfg = _run_model_config(config, tok)
    adapters = _adapter_tree(arch, cfg, modules, scales)
    fs.makedirs(workdir)
    if tok is not None:
        tokenizers.save(tok, workdir / "tokenizer.json")
    fs.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    _save_params(adapters, workdir / "checkpoints")
    _record_base(workdir, cfg, config.train.init_from, lora_base)
    return config


def _adapter_tree(arch: str, cfg: ModelConfig, modules: dict, scales: dict) -> Any:
    """lm's adapter tree (zeros where the folder has none), each module's A padded to lm's rank
    and its B scaled by its own scale over lm's."""
    import jax

    tree = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), split(param_shapes(cfg))[0])
    params, rank = _LmParams(cfg, tree), cfg.lora_rank
    lm_scale = cfg.lora_alpha / rank
    for module, weights in modules.items():
        layer, name = _lm_module(arch, module, cfg.num_layers)
        a, b = weights["A"], weights["B"] * (scales[module] / lm_scale)
        a = np.pad(a, ((0, rank - a.shape[0]), (0, 0)))
        b = np.pad(b, ((0, 0), (0, rank - b.shape[1])))
        for target, (fused, third) in _modules(arch).items():
            if fused != name or target not in cfg.lora_targets:
                continue
            fan_out = _fan(cfg, target)[1]
            rows = b if third is None else b[third * fan_out:(third + 1) * fan_out]
            path = _LM_PATHS[target]
            shape_a = params.get(f"{path}/lora_a", layer).shape
            shape_b = params.get(f"{path}/lora_b", layer).shape
            params.set(f"{path}/lora_a", layer, a.T.reshape(shape_a))
            params.set(f"{path}/lora_b", layer, rows.T.reshape(shape_b))
    return tree


def _record_base(workdir: fs.Path, cfg: ModelConfig, init_from: str, lora_base: Any) -> None:
    """The imported adapters' lora_base.json: their base, as a run records it at its start."""
    import jax

    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=host),
                            split(param_shapes(cfg))[1])
    lora_base.restore_base(workdir, init_from, abstract, record=True)
