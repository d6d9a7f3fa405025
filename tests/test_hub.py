"""HuggingFace hub names: `lm.load("hf:NAME")`, `lm.evaluate --hf=NAME`, `lm.hf import --hf_dir=NAME`
against transformers reading the same hub cache.

The tests build the cache themselves, in huggingface_hub's layout (models--org--name/snapshots/
<commit>/ and refs/), with a random GPT-2 whose tokenizer is GPT-2-era vocab.json + merges.txt (in
two revisions) and a Llama 3-style model with its tokenizer.json; everything runs with
HF_HUB_OFFLINE=1, so nothing can be downloaded.
"""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from hf_models import (LINES, VOCAB, WORDS, hf_logits, last_line, llama3_model,  # noqa: E402
                       llama3_tokenizer, perturb, run, token_ids, train_bpe)

import lm  # noqa: E402
from lm import hf, hub  # noqa: E402
from lm import tokenizer as tokenizers  # noqa: E402
from lm.config import ConfigError  # noqa: E402

GPT2, LLAMA = "lm-test/tiny-gpt2", "lm-test/tiny-llama3"
OLD, NEW, LLAMA_COMMIT = "1" * 40, "2" * 40, "3" * 40
TEXTS = LINES + [" ".join(WORDS), "<|endoftext|> a special token<|endoftext|>",
                 "<|begin_of_text|>hello<|end_of_text|> there", "   leading and trailing   ",
                 "\n\n\ttabs\n", "x"]


def add_snapshot(hub_dir, repo, folder, commit, refs):
    """A snapshot as huggingface_hub leaves it: plain files (no blobs needed) under the commit."""
    repo_dir = hub_dir / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)


def gpt2_model(seed):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2,
                                     n_head=4, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    perturb(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The hub cache, offline, and an lm cache directory of the module's own, for this process
    and the binaries it starts."""
    root = tmp_path_factory.mktemp("hub")
    texts = [" ".join(np.random.default_rng(0).choice(WORDS, 4000))] + LINES * 20
    bpe = train_bpe(texts, VOCAB, ["<|endoftext|>"])
    bpe.save(str(root / "tokenizer.json"))
    for commit, seed, refs in ((OLD, 10, ["v1"]), (NEW, 11, ["main"])):
        folder = root / f"gpt2-{seed}"
        gpt2_model(seed).save_pretrained(folder)
        bpe.model.save(str(folder))  # vocab.json and merges.txt, as GPT-2's own repo has them
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}))
        add_snapshot(root / "hf" / "hub", GPT2, folder, commit, refs)
    folder = root / "llama3"
    llama3_model(12).save_pretrained(folder)
    llama3_tokenizer(root / "tokenizer.json", folder)
    add_snapshot(root / "hf" / "hub", LLAMA, folder, LLAMA_COMMIT, ["main"])
    env = {"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "LM_CACHE": str(root / "lm")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("HF_HUB_CACHE", raising=False)
        # huggingface_hub read the environment when transformers imported it
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hf" / "hub"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield root


def reference(name, cache_root):
    """transformers' tokenizer and float32 model of hub model `name`, from the same cache."""
    repo, revision = hub.parse(name)
    kwargs = dict(cache_dir=cache_root / "hf" / "hub", local_files_only=True, revision=revision)
    return (transformers.AutoTokenizer.from_pretrained(repo, **kwargs),
            transformers.AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32,
                                                              **kwargs).eval())


def hf_greedy(model, tokenizer, prompt, new_tokens):
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("name", [GPT2, LLAMA])
def test_tokenization_is_transformers_for_unicode_whitespace_and_special_tokens(cache, name):
    workdir = hf.cached_import(name)
    ours = tokenizers.load(workdir / "tokenizer.json")
    theirs, _ = reference(name, cache)
    for text in TEXTS:
        assert ours.encode(text).tolist() == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text)) == text
        if text:  # a prompt's ids: the template's special tokens too (Llama's begin-of-text)
            assert tokenizers.prompt_ids(ours, text).tolist() == theirs(text).input_ids, text
    assert (ours.eos_id, ours.bos_id) == (theirs.eos_token_id, theirs.bos_token_id)
    if name == LLAMA:  # documents start with begin-of-text, GPT-2's with its end-of-text
        assert tokenizers.document_ids(ours, "x").tolist() == theirs("x").input_ids
    else:
        assert tokenizers.document_ids(ours, "x").tolist() == [0] + theirs("x").input_ids


def test_evaluate_samples_from_a_hub_name_then_reuses_the_import(cache, tmp_path):
    """The seed's example as one command: it imports into the lm cache, samples; the next call
    reuses the import, and greedy decoding there prints transformers' greedy continuation."""
    env = dict(os.environ, LM_CACHE=str(tmp_path / "lm_cache"))
    result = run("lm.evaluate", f"--hf={GPT2}", "--mode=sample", "--prompt=Once upon a time",
                 "--max_length=100", "--temperature=0.7", "--num_return_sequences=3", env=env)
    assert result.returncode == 0, result.stderr
    workdir = tmp_path / "lm_cache" / "hf" / "lm-test--tiny-gpt2" / NEW
    assert f"{GPT2}: imported into {workdir}" in result.stderr
    assert [f"--- sample {i} ---" in result.stdout for i in (1, 2, 3)] == [True] * 3
    stamp = (workdir / "checkpoints" / "0").stat().st_mtime_ns

    prompt = "alpha bravo"
    result = run("lm.evaluate", f"--hf={GPT2}", "--mode=sample", f"--prompt={prompt}",
                 "--max_new_tokens=16", "--temperature=0", f"--output_json={tmp_path / 'out.json'}",
                 env=env)
    assert result.returncode == 0, result.stderr
    assert f"{GPT2}: the import in {workdir}" in result.stderr
    assert (workdir / "checkpoints" / "0").stat().st_mtime_ns == stamp
    [sample] = json.loads((tmp_path / "out.json").read_text())["samples"]
    tokenizer, model = reference(GPT2, cache)
    assert sample["text"] == hf_greedy(model, tokenizer, prompt, 16)


def test_lm_load_of_a_hub_llama_generates_and_scores_as_transformers(cache):
    run_ = lm.load(f"hf:{LLAMA}")
    assert run_.model.cfg.rope_scaling == "llama3" and run_.model.cfg.param_dtype == "bfloat16"
    tokenizer, model = reference(LLAMA, cache)
    prompt = "alpha bravo charlie"
    assert run_.generate(prompt, 16, temperature=0) == [hf_greedy(model, tokenizer, prompt, 16)]
    text = "delta echo foxtrot golf hotel alpha"
    ids = torch.tensor([tokenizer(text).input_ids])  # begin-of-text first, as lm scores it
    with torch.no_grad():
        nll = model(ids, labels=ids).loss.item()
    assert run_.perplexity(text).cross_entropy == pytest.approx(nll, abs=1e-4)
    assert lm.load(f"hf:{LLAMA}").step == 0  # again: from the cached import


def test_a_revision_pin_picks_its_snapshot(cache, tmp_path):
    ids = token_ids((2, 16), seed=7)
    pinned = lm.load(f"hf:{GPT2}@v1")
    _, old = reference(f"{GPT2}@v1", cache)
    _, new = reference(GPT2, cache)
    np.testing.assert_allclose(pinned.logits(ids), hf_logits(old, ids), atol=1e-4, rtol=0)
    assert np.abs(hf_logits(new, ids) - hf_logits(old, ids)).max() > 0.1
    # Keyed by the commit: the tag and the commit name one import; lm.hf import takes names too.
    assert hf.cached_import(f"{GPT2}@{OLD}") == hf.cached_import(f"{GPT2}@v1")
    config = hf.import_checkpoint(f"{GPT2}@v1", tmp_path / "imported")
    assert config.model.context_length == 128
    assert (tmp_path / "imported" / "checkpoints" / "0" / "params").is_dir()


def test_a_repo_neither_cached_nor_reachable_is_one_line(cache, tmp_path):
    result = run("lm.evaluate", "--hf=lm-test/missing", "--mode=sample")
    assert last_line(result).startswith("error: hub model lm-test/missing is neither in the "
                                        "HuggingFace cache")
    with pytest.raises(ConfigError, match=f"hub model {GPT2}@v9 is neither in") as error:
        lm.load(f"hf:{GPT2}@v9")
    assert "\n" not in str(error.value)
    result = run("lm.hf", "import", "--hf_dir=lm-test/missing", f"--workdir={tmp_path / 'out'}")
    assert last_line(result).startswith("error: hub model lm-test/missing is neither")
    assert not (tmp_path / "out").exists()
