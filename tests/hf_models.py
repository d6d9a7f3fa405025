"""What the HuggingFace tests share: small random transformers models, their comparison with lm,
a byte-level BPE trained here, and the binaries run as a user runs them. Nothing is downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import tokenizers as hf_tokenizers
import torch
import transformers

from lm.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
LINES = ["The quick brown fox jumps over the lazy dog.",
         "Le cœur a ses raisons que la raison ne connaît point.",
         "春眠不觉晓，处处闻啼鸟。 emoji 🎉🚀, family 👨‍👩‍👧",
         "a\tb\r\nc\x00d double  spaces   and trailing  ", "combining: e\u0301 n\u0303", ""]


def run(module, *args, env=None):
    env = dict(os.environ if env is None else env,
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def last_line(result):
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def train_bpe(texts, vocab_size, special_tokens):
    """A byte-level BPE (GPT-2's kind) trained on `texts`; special tokens take the first ids."""
    bpe = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
    bpe.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = hf_tokenizers.decoders.ByteLevel()
    trainer = hf_tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens,
        initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return bpe


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))


def train_briefly(model, ids, steps=30):
    """A few Adam steps on the corpus, so the model's loss is far below ln(vocab)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    rng = np.random.default_rng(0)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - 32, 16)
        batch = torch.tensor(np.stack([ids[s:s + 32] for s in starts]))
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def lm_logits(cfg, params, ids):
    return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, ids))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def next_token_loss(logits, ids):
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, ids[:, 1:, None], -1).mean()


def token_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=64)


def llama3_tokenizer(tokenizer_file, out):
    """The words' BPE as Llama 3 ships one: begin/end-of-text special tokens, and a template that
    starts every text with <|begin_of_text|>."""
    bpe = hf_tokenizers.Tokenizer.from_file(str(tokenizer_file))
    bpe.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])  # ids 300, 301
    bpe.post_processor = hf_tokenizers.processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", 300)])
    bpe.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
         "tokenizer_class": "PreTrainedTokenizerFast"}))


def llama3_model(seed):
    """Llama 3.2's layout in small: rope scaling `llama3` (wavelengths across all three of its
    bands at head_dim 16), grouped-query attention 4:1, a tied head, stored in bfloat16."""
    config = transformers.LlamaConfig(
        vocab_size=304, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE, rms_norm_eps=1e-5,
        bos_token_id=300, eos_token_id=301)
    model = transformers.LlamaForCausalLM(config)
    perturb(model, seed)
    return model.to(torch.bfloat16).eval()
