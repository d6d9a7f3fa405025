"""The config schema: every field a run has, its default, and the checks that run before any work.

Named configs in `configs/` start from `default_config()` and override what they need; any field can
be overridden on the command line (`--config.model.num_layers=2`).
"""

from __future__ import annotations

import re
import sys
from typing import Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags


class ConfigError(ValueError):
    """A problem in the config or input that the user can fix; shown as one line, no traceback."""


def default_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0                  # initial weights, data order and split, dropout: one seed for all

    c.model = m = ConfigDict()
    m.vocab_size = 0            # 0: the tokenizer's size rounded up to `vocab_multiple`
    m.vocab_multiple = 128      # padding the vocabulary makes the head matmul and its sharding even
    m.num_layers = 6            # Transformer blocks
    m.num_heads = 6             # query heads; must divide d_model
    m.num_kv_heads = 0          # 0: = num_heads (multi-head); fewer: grouped-query attention
    m.d_model = 384             # residual stream width
    m.d_ff = 0                  # 0: 4*d_model for gelu, 8/3*d_model rounded up to 256 for swiglu
    m.context_length = 256      # tokens per training window (and the learned position table)
    m.dropout = 0.0             # on embeddings, attention weights and residual branches
    m.norm = "layernorm"        # layernorm | rmsnorm
    m.norm_eps = 1e-5           # added to the variance in the norms
    m.position = "learned"      # learned | rope
    m.rope_theta = 10000.0      # rope's base wavelength
    m.rope_scaling = "none"     # none | linear | llama3 (Llama 3.1+): rope frequencies stretched
                                # for a longer context than pretraining's (model.rope_frequencies)
    m.rope_scaling_factor = 1.0  # linear, llama3: how much longer the context is
    m.rope_low_freq_factor = 1.0   # llama3: wavelengths over original_context/this are divided fully
    m.rope_high_freq_factor = 4.0  # llama3: wavelengths under original_context/this are kept
    m.rope_original_context = 8192  # llama3: the context length of pretraining
    m.mlp = "gelu"              # gelu (tanh approximation, GPT-2) | gelu_exact (erf) | swiglu
    m.use_bias = True           # biases in linear layers and LayerNorm (GPT-2 True, LLaMA False)
    m.qkv_bias = False          # biases on the query, key and value projections even without
                                # use_bias (Qwen2's layout)
    m.tie_embeddings = True     # the output head is the embedding table (GPT-2) or its own (LLaMA)
    m.init_std = 0.02           # normal init std; residual output projections / sqrt(2 layers)
    m.dtype = "float32"         # compute dtype, e.g. bfloat16 (float16: inference only, since
                                # training has no loss scaling)
    m.param_dtype = "float32"   # parameters and optimizer state
    m.remat_policy = "none"     # none, or a jax.checkpoint_policies name, e.g. nothing_saveable
    m.scan_layers = True        # one compiled block looped over the layers: compile time flat in
                                # depth; False unrolls them (faster steps on a CPU)
    m.attention_impl = "auto"   # auto (splash on TPU, cuDNN on GPU in 16-bit, else xla) | xla |
                                # cudnn | splash; see docs/scaling.md
    m.loss_chunk_positions = 0  # head and loss over chunks of this many positions, logits never
                                # whole; 0: automatic (chunks where logits are large); >= context: whole

    c.data = d = ConfigDict()
    d.path = "builtin:python_docs"  # text/.jsonl/.parquet/.arrow (.gz, .zst) files, directories
                                    # or globs (comma-separated; local, gs://, s3://),
                                    # builtin:python_docs, hf:NAME (a HuggingFace hub dataset,
                                    # streamed), or a directory `python -m lm.prepare` wrote
    d.tokenizer = "char"            # char | byte | train:N (sentencepiece, N pieces) | a .model path
                                    # | a tokenizer .json (HuggingFace or a workdir's)
    d.val_fraction = 0.1            # held out by document; fewer than 10 texts: each one's tail
    d.format = "text"               # text | prompt_completion (jsonl examples, loss on completions)
                                    # | chat (`messages` conversations, loss on assistant turns)
    d.text_field = "text"           # the field (jsonl) or column (parquet, arrow) of the text
    d.prompt_field = "prompt"       # prompt_completion: the field of the prompt
    d.completion_field = "completion"  # prompt_completion: the field of the completion
    d.messages_field = "messages"   # chat: the field of a conversation's [{role, content}, ...]
    d.chat_template = ""            # chat: a Jinja chat template, or a .jinja file holding one;
                                    # "": the tokenizer's own (HuggingFace), else ChatML (lm/chat.py)
    d.segment_documents = False     # attention and positions restart at every document (packing),
                                    # each from the end-of-document id before it
    d.prepared_dir = ""             # where a run prepares its data; "": <workdir>/data
    d.prepare_workers = 0           # processes tokenizing on each host; 0: one per CPU core
    d.read_threads = 0              # grain reader threads; 0 reads in the training thread, best for
                                    # local shards (page cache); raise it for slow or network disks
    d.shard_cache_dir = "~/.cache/lm/shards"  # prepared shards in a bucket are copied here once
                                    # (per object version) and memory-mapped; "": each window is a
                                    # ranged read from the bucket (nothing stored locally)

    c.lora = lr = ConfigDict()
    lr.rank = 0                 # 0: every weight trains; > 0: low-rank adapters of this rank train
                                # on a frozen base (train.init_from), which gets no optimizer state
    lr.alpha = 16.0             # an adapter's product is scaled by alpha/rank (PEFT's lora_alpha)
    lr.dropout = 0.0            # on the adapters' input only (PEFT's lora_dropout)
    lr.targets = "query,key,value,out,gate,up,down"  # projections that get adapters: attention's
                                # query/key/value/out, the MLP's gate (swiglu)/up/down

    c.optim = o = ConfigDict()
    o.learning_rate = 1e-3      # peak, reached after warmup
    o.min_learning_rate = 1e-4  # the floor the decay ends at
    o.warmup_steps = 100        # linear from 0 to learning_rate
    o.schedule = "cosine"       # cosine | linear | constant (after warmup)
    o.decay_steps = 0           # 0: train.steps (a resume that changes train.steps must set it)
    o.b1 = 0.9                  # AdamW first-moment decay
    o.b2 = 0.95                 # AdamW second-moment decay
    o.eps = 1e-8                # AdamW denominator epsilon
    o.weight_decay = 0.1        # decoupled, on matrices only (not norms, biases)
    o.decay_embeddings = False  # also decay the embedding tables
    o.grad_clip = 1.0           # global-norm clipping; 0 disables
    o.grad_accum_steps = 1      # micro-batches per step; the global batch is split evenly

    c.mesh = ms = ConfigDict()
    ms.data = -1                # batch split; -1: whatever the other axes leave of the devices
    ms.fsdp = 1                 # batch and parameters (along embed) split: ZeRO-3 style
    ms.tensor = 1               # heads, MLP width and vocabulary split: Megatron style
    ms.dcn_data = 1             # across hosts or TPU slices (MaxText's DCN axes): the data axis is
                                # this times the in-slice size, laid out so that only it crosses
                                # the slower network
    ms.dcn_fsdp = 1             # the same for the fsdp axis

    c.train = t = ConfigDict()
    t.steps = 1000              # optimizer updates in the whole run
    t.batch_size = 16           # global, in sequences
    t.z_loss = 0.0              # weight of mean(log Z^2), keeps the softmax normaliser near 1
    t.log_every = 50            # steps between console/metrics lines
    t.eval_every = 250          # steps between validation evaluations
    t.eval_batches = 20         # batches per evaluation, windows spread evenly over the split
    t.final_eval_batches = 0    # the evaluation after the last step; 0: eval_batches
    t.peak_flops_per_device = 0.0  # for MFU; 0: known accelerator table, or a measured matmul on CPU
    t.checkpoint_every = 500    # steps between saves (also saved at the end and on SIGTERM)
    t.checkpoint_every_minutes = 0.0  # also save this often in wall time (process 0's clock); 0: off
    t.keep_checkpoints = 3      # the latest K are kept...
    t.keep_every = 0            # ...plus every M-th step when M > 0
    t.init_from = ""            # a workdir or checkpoint step directory: its params start the run
    t.skip_nonfinite = False    # skip updates whose loss or gradient is NaN/inf instead of stopping
    t.sample_prompt = "\n"      # the sample printed at the end of a run starts with this
    t.sample_length = 200       # new tokens sampled at the end; 0: no sample
    t.sample_temperature = 0.8  # of that sample; 0 is greedy
    t.sample_top_k = 0          # of that sample; 0 keeps every token
    return c


MESH_AXES = ("data", "fsdp", "tensor")
_CHOICES = {
    "model.norm": ("layernorm", "rmsnorm"),
    "model.position": ("learned", "rope"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.mlp": ("gelu", "gelu_exact", "swiglu"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.attention_impl": ("auto", "xla", "cudnn", "splash"),
    "optim.schedule": ("cosine", "linear", "constant"),
}
DATA_FORMATS = ("text", "prompt_completion", "chat")
LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down")


def _get(config: ConfigDict, path: str):
    for key in path.split("."):
        config = config[key]
    return config


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def resolve_attention(impl: str, dtype: str, dropout: float) -> str:
    """The attention implementation a model runs (lm/attention.py). `auto`: Pallas splash attention
    on a TPU, cuDNN's fused attention on a GPU in 16-bit, else xla. Neither fused kernel has
    attention dropout: `auto` with dropout is xla, and naming one of them with dropout is refused."""
    if impl == "auto":
        import jax  # here, not on import: tokenizing workers import this module and need no JAX
        backend = jax.default_backend()
        if dropout == 0 and backend == "tpu":
            return "splash"
        if dropout == 0 and backend == "gpu" and dtype != "float32":
            return "cudnn"
        return "xla"
    _check(dropout == 0 or impl == "xla",
           f"config.model.attention_impl={impl!r} has no attention dropout, and "
           f"config.model.dropout={dropout}; set the dropout to 0, or attention_impl to xla or auto")
    return impl


def mesh_shapes(config: ConfigDict, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(in-slice, across-slice) sizes of (data, fsdp, tensor); a single -1 in the in-slice sizes is
    filled from the devices of one slice (a host, or a TPU slice)."""
    dcn = (config.mesh.dcn_data, config.mesh.dcn_fsdp, 1)
    sizes = [config.mesh[a] for a in MESH_AXES]
    _check(sizes.count(-1) <= 1 and all(s == -1 or s >= 1 for s in sizes) and min(dcn) >= 1,
           f"mesh {dict(zip(MESH_AXES, sizes))}: each axis must be >= 1, and at most one may be "
           f"-1; dcn_data and dcn_fsdp must be >= 1")
    slices = dcn[0] * dcn[1]
    _check(num_devices % slices == 0,
           f"config.mesh.dcn_data*dcn_fsdp={slices} slices do not divide {num_devices} devices")
    per_slice = num_devices // slices
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if -1 in sizes:
        _check(per_slice % fixed == 0,
               f"mesh {dict(zip(MESH_AXES, sizes))} cannot fill {per_slice} devices: "
               f"the fixed axes' product {fixed} must divide the device count")
        sizes[sizes.index(-1)] = per_slice // fixed
    total = 1
    for s in sizes:
        total *= s
    _check(total == per_slice,
           f"mesh data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]} needs {total * slices} devices "
           f"but {num_devices} are available; set --config.mesh.* so the product is "
           f"{per_slice}{' per slice' if slices > 1 else ''} (or set one axis to -1)")
    return tuple(sizes), dcn


def mesh_shape(config: ConfigDict, num_devices: int) -> tuple[int, ...]:
    """The whole mesh's (data, fsdp, tensor) sizes: in-slice times across-slice."""
    ici, dcn = mesh_shapes(config, num_devices)
    return tuple(i * d for i, d in zip(ici, dcn))


def validate_data(data: ConfigDict) -> None:
    """The checks of `config.data` alone (all that `python -m lm.prepare` needs)."""
    _check(data.format in DATA_FORMATS,
           f"config.data.format={data.format!r} is not one of {', '.join(DATA_FORMATS)}")
    tok = data.tokenizer
    _check(tok in ("char", "byte") or tok.endswith((".model", ".json"))
           or re.fullmatch(r"train:[1-9]\d*", tok) is not None,
           f"config.data.tokenizer={tok!r} is not char, byte, train:N, a sentencepiece .model "
           f"path or a tokenizer .json path")
    _check(0.0 <= data.val_fraction < 1.0,
           f"config.data.val_fraction={data.val_fraction} must be in [0, 1)")
    _check(data.read_threads >= 0, f"config.data.read_threads={data.read_threads} must be >= 0")
    _check(data.prepare_workers >= 0,
           f"config.data.prepare_workers={data.prepare_workers} must be >= 0 (0: one per core)")
    _check(re.match(r"[a-z][a-z0-9+.-]*://", data.shard_cache_dir) is None,
           f"config.data.shard_cache_dir={data.shard_cache_dir!r} must be a local directory (a "
           f"cache of bucket shards), or empty to read them by ranges")
    for name in ("text_field", "prompt_field", "completion_field", "messages_field"):
        _check(bool(data[name]), f"config.data.{name} is empty; name the jsonl field to read")


def validate_rope_scaling(m: ConfigDict) -> None:
    """The checks of config.model's rope scaling fields (also run on an imported HF config)."""
    if m.rope_scaling == "none":
        return
    _check(m.position == "rope", f"config.model.rope_scaling={m.rope_scaling!r} needs "
           f"config.model.position='rope' (it is {m.position!r})")
    _check(m.rope_scaling_factor > 0,
           f"config.model.rope_scaling_factor={m.rope_scaling_factor} must be > 0")
    if m.rope_scaling == "llama3":
        _check(0 < m.rope_low_freq_factor < m.rope_high_freq_factor,
               f"config.model.rope_low_freq_factor={m.rope_low_freq_factor} and "
               f"rope_high_freq_factor={m.rope_high_freq_factor} must satisfy 0 < low < high")
        _check(m.rope_original_context >= 1,
               f"config.model.rope_original_context={m.rope_original_context} must be >= 1")


def validate_lora(config: ConfigDict) -> None:
    """The checks of config.lora, and of what a LoRA run needs besides: a base to adapt."""
    lora = config.lora
    _check(lora.rank >= 0, f"config.lora.rank={lora.rank} must be >= 0 (0: no adapters)")
    if not lora.rank:
        return
    _check(lora.alpha > 0, f"config.lora.alpha={lora.alpha} must be > 0")
    _check(0.0 <= lora.dropout < 1.0, f"config.lora.dropout={lora.dropout} must be in [0, 1)")
    targets = [t.strip() for t in lora.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in LORA_TARGETS]
    _check(bool(targets) and not unknown,
           f"config.lora.targets={lora.targets!r}: "
           f"{'unknown ' + unknown[0] if unknown else 'empty'}; name some of "
           f"{', '.join(LORA_TARGETS)}")
    _check(bool(config.train.init_from),
           f"config.lora.rank={lora.rank} trains adapters on a frozen base, but "
           f"config.train.init_from is empty; set it to the base's workdir (e.g. one `python -m "
           f"lm.hf import` wrote)")


def validate(config: ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the field and the fix for anything that would fail later."""
    import jax  # here, not on import: tokenizing workers import this module and need no JAX

    num_devices = jax.device_count() if num_devices is None else num_devices
    for path, choices in _CHOICES.items():
        _check(_get(config, path) in choices,
               f"config.{path}={_get(config, path)!r} is not one of {', '.join(choices)}")
    m, o, t = config.model, config.optim, config.train
    for path in ("model.num_layers", "model.num_heads", "model.d_model", "model.context_length",
                 "train.steps", "train.batch_size", "optim.grad_accum_steps", "train.log_every",
                 "train.eval_every", "train.eval_batches", "train.checkpoint_every",
                 "train.keep_checkpoints"):
        _check(_get(config, path) >= 1, f"config.{path}={_get(config, path)} must be >= 1")
    _check(m.d_model % m.num_heads == 0,
           f"config.model.num_heads={m.num_heads} does not divide config.model.d_model="
           f"{m.d_model}; choose heads that divide the width")
    kv = m.num_kv_heads or m.num_heads
    _check(m.num_heads % kv == 0,
           f"config.model.num_kv_heads={kv} does not divide config.model.num_heads={m.num_heads}")
    _check(m.position != "rope" or (m.d_model // m.num_heads) % 2 == 0,
           f"rope needs an even head dimension, got d_model/num_heads={m.d_model // m.num_heads}")
    validate_rope_scaling(m)
    _check(0.0 <= m.dropout < 1.0, f"config.model.dropout={m.dropout} must be in [0, 1)")
    resolve_attention(m.attention_impl, m.dtype, m.dropout)
    _check(m.attention_impl != "cudnn" or (jax.default_backend() == "gpu" and m.dtype != "float32"),
           f"config.model.attention_impl='cudnn' needs a GPU and a 16-bit config.model.dtype (here "
           f"{jax.default_backend()}, {m.dtype}); use 'auto' to pick it only where it runs")
    _check(m.attention_impl != "splash" or jax.default_backend() == "tpu",
           f"config.model.attention_impl='splash' needs a TPU (here {jax.default_backend()}, where "
           f"Pallas would only interpret it, slowly); use 'auto' to pick it only where it runs")
    _check(m.loss_chunk_positions >= 0,
           f"config.model.loss_chunk_positions={m.loss_chunk_positions} must be >= 0 (0: automatic)")
    _check(m.dtype != "float16",
           "config.model.dtype='float16' would train without loss scaling (small gradients "
           "underflow to 0); use bfloat16, which has float32's range")
    _check(m.remat_policy == "none" or hasattr(jax.checkpoint_policies, m.remat_policy),
           f"config.model.remat_policy={m.remat_policy!r} is not 'none' or a name in "
           f"jax.checkpoint_policies (e.g. nothing_saveable, dots_saveable)")
    validate_data(config.data)
    validate_lora(config)
    for path in ("optim.learning_rate", "optim.min_learning_rate", "optim.weight_decay",
                 "optim.grad_clip", "optim.warmup_steps", "optim.decay_steps", "train.z_loss",
                 "train.checkpoint_every_minutes", "train.keep_every", "train.sample_length",
                 "train.final_eval_batches"):
        _check(_get(config, path) >= 0, f"config.{path}={_get(config, path)} must be >= 0")
    _check(o.min_learning_rate <= o.learning_rate,
           f"config.optim.min_learning_rate={o.min_learning_rate} exceeds "
           f"config.optim.learning_rate={o.learning_rate}")

    data, fsdp, tensor = mesh_shape(config, num_devices)
    batch_shards = data * fsdp
    _check(t.batch_size % (batch_shards * o.grad_accum_steps) == 0,
           f"config.train.batch_size={t.batch_size} must be divisible by data*fsdp={batch_shards} "
           f"times config.optim.grad_accum_steps={o.grad_accum_steps}")
    for path in ("model.num_heads", "model.num_kv_heads"):
        heads = _get(config, path) or m.num_heads
        _check(heads % tensor == 0, f"config.{path}={heads} must be divisible by "
               f"config.mesh.tensor={tensor} (heads are split over the tensor axis)")
    _check(m.d_model % fsdp == 0,
           f"config.model.d_model={m.d_model} must be divisible by config.mesh.fsdp={fsdp}")


def over_defaults(saved: dict) -> ConfigDict:
    """A saved run config (a workdir's config.json) over today's defaults: the fields added since
    it was written take their defaults, and the fields removed since are dropped, so a workdir an
    older lm wrote loads (checkpoint.load_run_config reads it)."""
    config = default_config()

    def merge(target: ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if key not in target:  # a field removed since: nothing reads it
                continue
            if isinstance(target[key], ConfigDict) and isinstance(value, dict):
                merge(target[key], value)
            else:
                target[key] = type(target[key])(value) if isinstance(target[key], float) else value
    merge(config, saved)
    return config


def load_config_flag(flag: flags.FlagHolder) -> ConfigDict:
    """The config of a `config_flags.DEFINE_config_file` flag, or a one-line error and exit."""
    config = flag.value
    if isinstance(config, ConfigDict):
        return config
    try:  # ml_collections stands in an object that raises the load error on first use
        config.to_dict()
    except OSError as e:
        reason = str(e).strip().splitlines()[-1].strip()
    sys.exit(f"error: --config={config_flags.get_config_filename(flags.FLAGS[flag.name])}: "
             f"cannot load it ({reason}); pass a config file such as configs/quickstart.py")


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl flag parsing whose every failure is a one-line error, never a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:  # a malformed value, e.g. --config.train.steps=abc
        sys.exit(f"error: {e}")
    except SyntaxError as e:  # in the --config file
        sys.exit(f"error: {e.filename}:{e.lineno}: {e.msg}; fix the config file")
    except (AttributeError, KeyError) as e:  # ml_collections' report of a missing field
        field = re.search(r"[A-Za-z_]\w*", str(e))
        field = field.group() if field else "?"
        suggestion = re.search(r'Did you mean "(\w+)"', str(e))
        hint = f'did you mean "{suggestion.group(1)}"? ' if suggestion else ""
        bad = [a.split("=")[0] for a in argv[1:]
               if re.fullmatch(rf"--config(\.\w+)*\.{field}(\.\w+)*", a.split("=")[0])]
        sys.exit(f"error: {bad[0] if bad else '--config'}: unknown config field '{field}'; "
                 f"{hint}the fields are listed in lm/config.py")
