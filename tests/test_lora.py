"""LoRA: adapters start as the base and merge into it, train alone (optimizer state for them only) on
any mesh, resume bitwise, and travel to and from HuggingFace PEFT with transformers' logits.

One LoRA run serves most tests: an imported GPT-2 (transformers, random, saved here) fine-tuned on
chat jsonl whose assistant always answers "ok", on a 2x2x2 mesh with gradient accumulation, remat
and scanned layers. Nothing is downloaded.
"""

import dataclasses
import functools
import json
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from configs import imported  # noqa: E402
from hf_models import ROOT, VOCAB, perturb, token_ids, train_bpe  # noqa: E402
from test_checkpoint import losses  # noqa: E402
from trees import assert_trees_close  # noqa: E402

import lm  # noqa: E402
from lm import checkpoint, hf, hf_peft, lora, lora_base, optim, sharding, step  # noqa: E402
from lm.config import ConfigError, default_config  # noqa: E402
from lm.model import ModelConfig, Transformer  # noqa: E402
from lm.train import _check_resumable, train_and_evaluate  # noqa: E402

WORDS = ["alpha", "bravo", "charlie", "delta", "echo"]
TOLERANCE = 1e-4  # float32 logits of lm against transformers/peft (measured: ~1e-6)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """GPT-2's kind of BPE: <|endoftext|> its only special token, no chat template of its own."""
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe([" ".join(WORDS + ["ok", "user", "assistant"])] * 50, VOCAB,
              ["<|endoftext|>"]).save(str(out))
    return out


def save_with_tokenizer(model, tokenizer_file, out):
    model.save_pretrained(out)
    shutil.copy(tokenizer_file, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
         "bos_token": "<|endoftext|>"}))
    return out


@pytest.fixture(scope="module")
def gpt2(tokenizer_file, tmp_path_factory):
    """(transformers folder, lm workdir of its import)."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    perturb(model, 0)
    folder = save_with_tokenizer(model, tokenizer_file, tmp_path_factory.mktemp("gpt2"))
    base = tmp_path_factory.mktemp("gpt2_lm") / "base"
    hf.import_checkpoint(folder, base)
    return folder, base


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(64):
        turns = [("user", " ".join(rng.choice(WORDS, 3))), ("assistant", "ok")] * (1 + i % 2)
        lines.append(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}))
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def lora_config(base, chats):
    config = imported.get_config(str(base))
    config.data.update(path=str(chats), format="chat", segment_documents=True, val_fraction=0.1)
    config.lora.update(rank=4, alpha=8.0)
    config.model.remat_policy = "nothing_saveable"
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.optim.update(learning_rate=2e-2, min_learning_rate=2e-2, warmup_steps=2,
                        grad_accum_steps=2, weight_decay=0.0)
    config.train.update(steps=24, batch_size=8, log_every=1, eval_every=1000, eval_batches=1,
                        checkpoint_every=12, sample_length=0)
    return config


@pytest.fixture(scope="module")
def lora_run(gpt2, chats, tmp_path_factory):
    config = lora_config(gpt2[1], chats)
    workdir = tmp_path_factory.mktemp("lora_run")
    train_and_evaluate(config, workdir)
    return config, workdir


def adapter_shapes(config):
    cfg = ModelConfig.for_run(config, VOCAB, 1)
    return lora.split(hf.param_shapes(cfg))


def test_adapters_start_as_the_base_merge_into_it_and_shard_by_the_rules():
    cfg = ModelConfig.from_config(default_config().model, 64)
    cfg = dataclasses.replace(cfg, num_layers=2, d_model=32, num_heads=4, num_kv_heads=4,
                              d_ff=64, context_length=16, lora_rank=4, lora_alpha=8.0,
                              lora_targets=("query", "value", "out", "up", "down"))
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                           jnp.zeros((1, 16), jnp.int32))["params"]
    params = jax.jit(lambda: nn.unbox(Transformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]))()
    adapters, base = lora.split(params)
    with_adapters, plain = (jax.jit(Transformer(c).apply) for c in (cfg, lora.plain(cfg)))
    ids = token_ids((2, 16)) % 64
    np.testing.assert_array_equal(with_adapters({"params": params}, ids),
                                  plain({"params": base}, ids))  # B = 0: the base itself
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                            adapters)
    params = lora.combine(adapters, base)
    merged = jax.jit(lambda p: lora.merge(cfg, p)[1])(params)
    assert lora.merge(cfg, params)[0] == lora.plain(cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    unmerged = with_adapters({"params": params}, ids)
    np.testing.assert_allclose(plain({"params": merged}, ids), unmerged, atol=1e-5)
    assert np.abs(unmerged - plain({"params": base}, ids)).max() > 1e-2
    # Adapters are float32 and named by their kernel's axes: the rules table shards them.
    specs = nn.get_partition_spec(boxed)["layers"]
    assert specs["attn"]["query"]["lora_a"] == jax.sharding.PartitionSpec("layers", "embed", None)
    assert specs["attn"]["out"]["lora_b"] == jax.sharding.PartitionSpec("layers", None, "embed")
    assert specs["mlp"]["up"]["lora_b"] == jax.sharding.PartitionSpec("layers", None, "mlp")
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {np.dtype("float32")}
    assert "lora_a" not in params["layers"]["attn"]["key"]


def test_a_lora_step_on_a_mesh_with_accumulation_and_remat_matches_one_device():
    """Adapters-only training on a 2x2x2 mesh with 2 micro-batches and remat takes the steps a plain
    train_step takes on one device; the bfloat16 base is untouched; the optimizer holds state for
    the float32 adapters only."""
    config = default_config()
    config.model.update(num_layers=2, d_model=32, num_heads=4, d_ff=64, context_length=16,
                        vocab_size=64, param_dtype="bfloat16", remat_policy="nothing_saveable")
    config.lora.update(rank=4, targets="query,key,value,out,up,down")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    model = Transformer(ModelConfig.for_run(config, 64, 2))
    mesh = sharding.make_mesh(config)
    optimizer, schedule = optim.make_optimizer(config.optim, 10), optim.learning_rate_schedule(
        config.optim, 10)
    steps = step.compile_steps(model, optimizer, schedule, mesh, seed=0, batch_size=8,
                               grad_accum_steps=2)
    state = steps.init()
    assert state.frozen is None  # the base is restored, never drawn
    base = jax.tree.map(lambda s: (0.1 * jax.random.normal(jax.random.key(3), s.shape)).astype(
        s.dtype), steps.abstract_state.frozen)
    state = state.replace(frozen=jax.device_put(base, steps.state_sharding.frozen))
    reference = jax.device_get(state)
    plain_step = jax.jit(functools.partial(
        step.train_step, model=Transformer(dataclasses.replace(model.cfg, remat_policy="none")),
        optimizer=optimizer, schedule=schedule, z_loss=0.0, grad_accum_steps=1,
        dropout_seed=None))
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"inputs": rng.integers(0, 64, (8, 16)).astype(np.int32),
                 "targets": rng.integers(0, 64, (8, 16)).astype(np.int32),
                 "mask": np.ones((8, 16), np.float32)}
        state, metrics = steps.train(state, sharding.global_batch(mesh, batch, 8))
        reference, expected = plain_step(reference, batch)
        np.testing.assert_allclose(float(metrics["loss"]), float(expected["loss"]), rtol=1e-5)
    assert_trees_close(jax.device_get(state.params), jax.device_get(reference.params), atol=1e-5)
    assert_trees_close(jax.device_get(state.frozen), jax.device_get(base))
    adapters = sum(x.size for x in jax.tree.leaves(steps.abstract_state.params))
    moments = sum(x.size for x in jax.tree.leaves(steps.abstract_state.opt_state))
    assert adapters == lora.adapter_parameters(model.cfg)
    assert moments == 2 * adapters + 2  # Adam's mu and nu, two counts: nothing for the base
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {np.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype(jnp.float32)}


def test_lora_run_learns_checkpoints_adapters_alone_and_resumes_bitwise(lora_run, gpt2,
                                                                        tmp_path):
    config, workdir = lora_run
    trained = losses(workdir)
    assert trained[24] < 0.2 * trained[1]  # it learned to answer "ok" and end the turn
    record = json.loads((workdir / lora_base.BASE_RECORD).read_text())
    assert record["base"] == str(gpt2[1].resolve() / "checkpoints" / "0")
    adapters, _ = adapter_shapes(config)
    saved = checkpoint.restore_params(workdir, adapters)  # the checkpoint holds the adapters only
    # Stopped after step 12's checkpoint: the rerun reads the same batches, base and state.
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "24")
    train_and_evaluate(lora_config(gpt2[1], config.data.path), resumed)
    again = losses(resumed)
    assert [again[s] for s in range(13, 25)] == [trained[s] for s in range(13, 25)]
    assert_trees_close(checkpoint.restore_params(resumed, adapters), saved)


def test_resume_refuses_another_template_or_adapter_shape_and_a_changed_base(lora_run, gpt2,
                                                                             tmp_path):
    config, workdir = lora_run
    for field, value in (("data.chat_template", "{{ messages }}"), ("lora.rank", 8)):
        changed = lora_config(gpt2[1], config.data.path)
        section, name = field.split(".")
        changed[section][name] = value
        with pytest.raises(ConfigError, match=f"created with {field}="):
            train_and_evaluate(changed, workdir)
    # A workdir from before config.lora and data.chat_template existed resumes: they had defaults.
    old = json.loads(default_config().to_json())
    del old["lora"], old["data"]["chat_template"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    _check_resumable(default_config(), tmp_path / "old")
    moved = tmp_path / "run"
    shutil.copytree(workdir, moved, ignore=shutil.ignore_patterns("checkpoints", "data"))
    record = json.loads((moved / lora_base.BASE_RECORD).read_text())
    record["fingerprint"][0] += 1  # as if the base's embedding had changed since
    (moved / lora_base.BASE_RECORD).write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="not the one this run's adapters were trained on"):
        lora_base.restore_base(moved, str(gpt2[1]), adapter_shapes(config)[1])
    with pytest.raises(ConfigError, match="adapters for the base .* not config.train.init_from"):
        lora_base.restore_base(moved, str(tmp_path), adapter_shapes(config)[1])
    bad = lora_config(gpt2[1], config.data.path)
    bad.train.init_from = ""
    with pytest.raises(ConfigError, match="config.train.init_from is empty"):
        train_and_evaluate(bad, tmp_path / "no_base")


def test_peft_export_loads_in_transformers_with_lm_logits(lora_run, gpt2, tmp_path):
    """The run's adapters as a PEFT folder on the transformers base, and the run merged into a
    transformers model, give lm.load's logits (GPT-2's fused c_attn: q/k/v adapters stacked)."""
    _, workdir = lora_run
    ids = token_ids((2, 24))
    ours = lm.load(workdir).logits(ids)
    hf_peft.export_adapter(workdir, tmp_path / "adapter")
    spec = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert spec["rank_pattern"] == {"attn.c_attn": 12} and spec["fan_in_fan_out"]
    base = transformers.GPT2LMHeadModel.from_pretrained(gpt2[0]).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = adapted(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    print(f"peft: max |logit difference| {np.abs(ours - theirs).max():.2e}")
    np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)
    assert np.abs(ours - lm.load(gpt2[1]).logits(ids)).max() > 100 * TOLERANCE

    hf.export_checkpoint(workdir, tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.tensor(ids, dtype=torch.long)).logits.numpy(),
                                   ours, atol=TOLERANCE, rtol=0)
    # The merged model's tokenizer renders chats as the run did (its end of turn: <|endoftext|>).
    run = lm.load(workdir)
    conversation = [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "ok"}]
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged").apply_chat_template(
        conversation, tokenize=True, return_dict=False)
    np.testing.assert_array_equal(run.chat_template.encode(lm.chat.Chat(
        tuple((m["role"], m["content"]) for m in conversation)))[0], theirs)


def test_chat_sampling_answers_and_stops_at_the_end_of_turn(lora_run):
    _, workdir = lora_run
    result = subprocess.run(
        [sys.executable, "-m", "lm.evaluate", f"--workdir={workdir}", "--mode=sample", "--chat",
         "--prompt=charlie delta echo", "--temperature=0", "--max_new_tokens=12",
         f"--output_json={workdir / 'sample.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    [sample] = json.loads((workdir / "sample.json").read_text())["samples"]
    assert sample["text"] == "ok"


def random_adapter(model, config, seed):
    """A PEFT model with `config`'s adapters, B drawn too (PEFT starts it at zero)."""
    adapted = peft.get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.copy_(0.15 * torch.randn_like(p))
    return adapted.eval()


def test_adapters_peft_made_import_with_peft_logits(gpt2, tokenizer_file, tmp_path):
    """GPT-2 (fused c_attn, Conv1D) and LLaMA (grouped-query attention, an untied head) adapters
    made by peft itself, with per-module ranks and alphas and rsLoRA, import into lm with peft's
    logits; the LLaMA one exports back to a folder peft loads with the same logits."""
    ids = token_ids((2, 24))
    gpt2_model = transformers.GPT2LMHeadModel.from_pretrained(gpt2[0])
    llama_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(1)
    llama_model = transformers.LlamaForCausalLM(llama_config)
    perturb(llama_model, 1)
    llama_folder = save_with_tokenizer(llama_model, tokenizer_file, tmp_path / "llama")
    hf.import_checkpoint(llama_folder, tmp_path / "llama_lm")
    cases = {
        "gpt2": (gpt2_model, gpt2[1], peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
        "llama": (llama_model.eval(), tmp_path / "llama_lm", peft.LoraConfig(
            r=4, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 8},
            alpha_pattern={"down_proj": 4}, layers_to_transform=[1],
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                            "down_proj"]))}
    for seed, (name, (model, base, config)) in enumerate(cases.items()):
        adapted = random_adapter(model, config, seed)
        adapted.save_pretrained(tmp_path / f"{name}_adapter")
        with torch.no_grad():
            theirs = adapted(torch.tensor(ids, dtype=torch.long)).logits.numpy()
            with adapted.disable_adapter():
                assert np.abs(adapted(torch.tensor(ids)).logits.numpy() - theirs).max() > 0.1
        hf_peft.import_adapter(tmp_path / f"{name}_adapter", tmp_path / f"{name}_run", base)
        ours = lm.load(tmp_path / f"{name}_run").logits(ids)
        print(f"{name}: max |logit difference| {np.abs(ours - theirs).max():.2e}")
        np.testing.assert_allclose(ours, theirs, atol=TOLERANCE, rtol=0)
    hf_peft.export_adapter(tmp_path / "llama_run", tmp_path / "llama_again")
    again = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(
        llama_folder), tmp_path / "llama_again").eval()
    with torch.no_grad():
        np.testing.assert_allclose(again(torch.tensor(ids, dtype=torch.long)).logits.numpy(),
                                   theirs, atol=TOLERANCE, rtol=0)


def test_bad_adapter_input_is_a_one_line_error(gpt2, lora_run, tmp_path):
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": True}))
    with pytest.raises(ConfigError, match="use_dora=True is not supported"):
        hf_peft.import_adapter(tmp_path / "dora", tmp_path / "out", gpt2[1])
    with pytest.raises(ConfigError, match="not a LoRA run"):
        hf_peft.export_adapter(gpt2[1], tmp_path / "nothing")
    config = lora_run[0].copy_and_resolve_references()
    config.lora.targets = "query,nose"
    with pytest.raises(ConfigError, match="unknown nose"):
        train_and_evaluate(config, tmp_path / "bad_targets")
