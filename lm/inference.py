"""A trained model ready to use from Python: `run = lm.load("runs/quickstart")`.

    run.logits(token_ids)               numpy in, float32 numpy out
    run.generate(["Once upon"], max_new_tokens=50, temperature=0.7)
    run.generate("Hi!", chat=True)      a user's turn in the run's chat template, answered
    lm.load("hf:gpt2")                  a HuggingFace hub model, imported once and cached
    run.perplexity(["Some held-out text."]).perplexity
    run.harness(["hellaswag"], limit=100)   lm-evaluation-harness's results dict (lm/harness.py)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh
from ml_collections import ConfigDict

from lm import checkpoint, fs, lora, lora_base, sharding
from lm import tokenizer as tokenizers
from lm.chat import ChatTemplate
from lm.config import ConfigError
from lm.model import ModelConfig, Transformer
from lm.perplexity import Score, score_documents
from lm.sampling import SamplingOptions, decoding_layout, decoding_model, generate


@dataclasses.dataclass
class LoadedModel:
    config: ConfigDict
    model: Transformer
    params: Any
    tokenizer: tokenizers.Tokenizer
    mesh: Mesh
    step: int

    def __post_init__(self):
        self._forward = jax.jit(self.model.apply)

    def logits(self, token_ids: np.ndarray) -> np.ndarray:
        """[batch, length] (or [length]) token ids -> float32 logits [..., vocab]."""
        ids = np.asarray(token_ids, np.int32)
        batch = ids[None] if ids.ndim == 1 else ids
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            out = np.asarray(self._forward({"params": self.params}, batch))
        return out[0] if ids.ndim == 1 else out

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 max_new_tokens: int = 100, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None, skip_special_tokens: bool = True,
                 chat: bool = False) -> list[str]:
        """Continuations of each prompt, cut at the end-of-document token and before any `stop`.

        A prompt is a text, which starts as `prompt_ids` starts it, or token ids, continued as
        they are. `on_text` streams the text of a single prompt as it is generated. Special tokens
        (e.g. <|endoftext|>) are left out of the text unless `skip_special_tokens` is False, as
        HuggingFace's decode does. `chat`: a text prompt is a user's turn in the run's chat
        template (lm/chat.py), and every reply ends at the end of turn.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        end = self.chat_template.end_of_turn if chat else self.tokenizer.eos_id
        on_token = None
        if on_text is not None:
            if len(prompts) != 1:
                raise ValueError("streaming (on_text) needs a single prompt")
            on_token = _Streamer(self.tokenizer, on_text, skip_special_tokens, end)
        ids = [self.prompt_ids(p, chat) if isinstance(p, str) else np.asarray(p, np.int32)
               for p in prompts]
        tokens = self.generate_tokens(ids, max_new_tokens,
                                      options=SamplingOptions(temperature, top_k, top_p),
                                      seed=seed, on_token=on_token, eos_id=end)
        return [_cut(self.tokenizer.decode(t, skip_special_tokens), stop) for t in tokens]

    def prompt_ids(self, prompt: str, chat: bool = False) -> np.ndarray:
        """The ids `generate` starts from: the prompt as a document starts, or with `chat` as a
        user's turn opening the assistant's."""
        if chat:
            return self.chat_template.prompt_ids(prompt)
        return tokenizers.prompt_ids(self.tokenizer, prompt)

    @functools.cached_property
    def chat_template(self) -> ChatTemplate:
        """The chat template the run trained with (or the tokenizer's own, or ChatML)."""
        return ChatTemplate.for_run(self.config.get("data", ConfigDict()), self.tokenizer)

    def generate_tokens(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                        options: SamplingOptions = SamplingOptions(), seed: int = 0,
                        on_token: Callable[[np.ndarray], None] | None = None, pad_to: int = 0,
                        eos_id: int | None = None) -> list[np.ndarray]:
        """The new ids after each prompt of ids, taken as given (`generate` starts each with the
        end-of-document id), up to the end-of-document token (or `eos_id`), which is left out.
        `pad_to`: see sampling.generate."""
        model, params = self._decoding
        return generate(model, params, prompts, max_new_tokens, options=options, seed=seed,
                        eos_id=self.tokenizer.eos_id if eos_id is None else eos_id,
                        mesh=self.mesh, valid_vocab=self.tokenizer.vocab_size,
                        on_token=on_token, pad_to=pad_to)

    @functools.cached_property
    def _decoding(self) -> tuple[Transformer, Any]:
        """The model and a second copy of its weights laid out for sampling, made at first use and
        kept: laying out costs tens of decoding steps (sampling.decoding_layout)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            params = jax.jit(lambda p: decoding_layout(self.model, p)[1])(self.params)
        return decoding_model(self.model), params

    def perplexity(self, texts: str | Sequence[str], *, stride: int | None = None,
                   batch_size: int = 8, progress: bool = False) -> Score:
        """Cross-entropy, perplexity and bits per byte of the texts, each scored as a document."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return score_documents(self.model, self.params, self.tokenizer, texts, self.mesh,
                               batch_size=batch_size, stride=stride, progress=progress)

    def harness(self, tasks: str | Sequence[str], **kwargs: Any) -> dict:
        """lm-evaluation-harness's results dict for `tasks` (lm.harness.run_harness: num_fewshot,
        limit, batch_size, include_path, ...); needs `pip install -e '.[eval]'`."""
        from lm.harness import run_harness
        return run_harness(self, tasks, **kwargs)


class _Streamer:
    """Decodes a growing list of ids and passes on only the new text (ids can merge into one
    character, so decoding token by token would garble multi-byte text)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, on_text: Callable[[str], None],
                 skip_special_tokens: bool, end: int):
        self.tokenizer, self.on_text, self.ids, self.text = tokenizer, on_text, [], ""
        self.skip_special_tokens, self.end = skip_special_tokens, end

    def __call__(self, tokens: np.ndarray) -> None:
        token = int(np.asarray(tokens)[0])
        if token == self.end:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, self.skip_special_tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of an incomplete UTF-8 sequence
            self.on_text(text[len(self.text):])
            self.text = text


def _cut(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[:min(cuts)] if cuts else text


def _workdir_and_step(path: fs.Path, step: int | None) -> tuple[fs.Path, fs.Path]:
    """(workdir, checkpoint step directory) for a workdir or a step directory, latest if no step."""
    if path.parent.name == "checkpoints" and fs.is_dir(path / "params"):
        return path.parent.parent, path
    if not fs.is_file(path / "config.json"):
        raise ConfigError(f"{path} is not a run's workdir (no config.json) nor a checkpoint step "
                          f"directory; pass the --workdir a training run wrote")
    steps = [s for s in checkpoint.saved_steps(path / "checkpoints")
             if fs.is_dir(path / "checkpoints" / str(s) / "params")]
    if not steps:
        raise ConfigError(f"{path} has no checkpoint yet; train it first, or wait for its first "
                          f"save (config.train.checkpoint_every)")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ConfigError(f"{path} has no checkpoint at step {step}; it has steps "
                          f"{', '.join(map(str, steps))}")
    return path, path / "checkpoints" / str(step)


def load(path: str | os.PathLike, *, step: int | None = None, fsdp: int = 1, tensor: int = 1,
         devices: Sequence[jax.Device] | None = None) -> LoadedModel:
    """The model, parameters and tokenizer of a workdir (latest checkpoint, or `step`) or of one
    checkpoint step directory, on a mesh of `devices` (default: all): `fsdp` and `tensor` as given,
    the rest data-parallel. `hf:NAME` (`hf:gpt2`, `hf:org/name@revision`) is a HuggingFace hub
    model, imported once into the lm cache directory (lm.hf.cached_import)."""
    if os.fspath(path).startswith("hf:"):
        from lm import hf
        path = hf.cached_import(os.fspath(path)[3:])
    checkpoint.check_directory(path)
    workdir, step_dir = _workdir_and_step(fs.absolute(path), step)
    config = checkpoint.load_run_config(workdir)
    # The mesh is this process's, whatever the training run's was (dcn_* spanned its hosts).
    config.mesh.update(data=-1, fsdp=fsdp, tensor=tensor, dcn_data=1, dcn_fsdp=1)
    tokenizer = tokenizers.load(workdir / "tokenizer.json")
    mesh = sharding.make_mesh(config, devices)
    cfg = ModelConfig.for_run(config, tokenizer.vocab_size, mesh.shape["tensor"])
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0),
                           np.zeros((1, cfg.context_length), np.int32))["params"]
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.unbox(boxed), sharding.tree_shardings(mesh, boxed))
    if cfg.lora_rank:  # the base and the adapters, merged once: a plain model from here on
        params = lora_base.restore(workdir, config.train.init_from, step_dir, abstract)
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            params = jax.jit(lambda p: lora.merge(cfg, p)[1])(params)
        cfg = lora.plain(cfg)
    else:
        params = checkpoint.restore_params(step_dir, abstract)
    return LoadedModel(config, Transformer(cfg), params, tokenizer, mesh, int(step_dir.name))
