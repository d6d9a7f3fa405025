"""Tokenizers behind one interface: sentencepiece (trained here), characters, raw bytes, and
HuggingFace `tokenizers` tokenizers (a `tokenizer.json`, e.g. GPT-2's byte-level BPE).

Each is saved to and loaded from `tokenizer.json` in the workdir (a sentencepiece model is embedded
in it), so a run can always decode what it trained on. The end-of-document id separates documents
in the token stream.

Train a sentencepiece model from the shell:
    python -m lm.tokenizer --input='corpus/*.txt' --model_prefix=DIR/spm --vocab_size=8000
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import sys
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np
import sentencepiece as spm

from lm import fs
from lm.config import ConfigError

EOS = "<eos>"


class Tokenizer(Protocol):
    """Every tokenizer's interface. A special id a tokenizer lacks is -1."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...
    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    # skip_special_tokens: leave out special tokens' text (e.g. <|endoftext|>), for display, as
    # HuggingFace's decode does; False (the default) keeps decode(encode(text)) == text.
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...
    def to_json(self) -> dict: ...


class _EndOfDocumentOnly:
    """Character and byte vocabularies: no beginning-of-text or padding id, no text for the
    end-of-document id (so nothing for skip_special_tokens to leave out), and no batch encoder
    faster than one text at a time."""
    bos_id = -1
    pad_id = -1

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]


class CharTokenizer(_EndOfDocumentOnly):
    """One id per character seen in the corpus; id 0 is end-of-document."""

    def __init__(self, chars: Sequence[str]):
        self.chars = list(chars)
        self.vocab_size = len(self.chars) + 1
        self.eos_id = 0
        codes = np.array([ord(c) for c in self.chars], np.uint32)
        self._order = np.argsort(codes)  # code points sorted, for a vectorised lookup
        self._sorted = codes[self._order]
        self._lookup = np.array([""] + self.chars, dtype=object)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> CharTokenizer:
        """Every character of `texts` (a stream: one text in memory at a time), found by numpy
        over each text's code points, not a Python loop over its characters."""
        codes = np.zeros(0, np.uint32)
        for text in texts:
            seen = np.unique(np.frombuffer(text.encode("utf-32-le"), np.uint32))
            if not np.isin(seen, codes, assume_unique=True).all():
                codes = np.union1d(codes, seen)
        return cls([chr(c) for c in codes.tolist()])

    def encode(self, text: str) -> np.ndarray:
        """Ids by numpy over the text's code points (no Python loop over its characters)."""
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        position = np.minimum(np.searchsorted(self._sorted, codes), max(len(self._sorted) - 1, 0))
        unseen = np.flatnonzero(self._sorted[position] != codes) if len(self._sorted) else \
            np.arange(len(codes))
        if len(unseen):
            raise ConfigError(f"character {chr(codes[unseen[0]])!r} is not in this run's character "
                              f"vocabulary (built from its training corpus); use characters it "
                              f"has seen")
        return (self._order[position] + 1).astype(np.int32)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        return "".join(self._lookup[ids[(ids > 0) & (ids < self.vocab_size)]])

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}


class ByteTokenizer(_EndOfDocumentOnly):
    """UTF-8 bytes as ids 0..255; 256 is end-of-document. Handles any text."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        data = bytes(int(i) for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "byte"}


class SentencePieceTokenizer:
    """A sentencepiece model, trained for an exact round trip (no normalisation, byte fallback)."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id, self.bos_id, self.pad_id = self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        if not fs.is_file(path):
            raise ConfigError(f"sentencepiece model {path} does not exist; train one with "
                              f"`python -m lm.tokenizer` or use config.data.tokenizer=train:N")
        return cls(fs.read_bytes(path))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Control ids (bos, eos, pad) have no text; skip_special_tokens also drops unknowns."""
        ids = [int(i) for i in ids if 0 <= i < self.vocab_size]
        if skip_special_tokens:
            ids = [i for i in ids if not self._sp.is_unknown(i)]
        return self._sp.decode(ids)

    def to_json(self) -> dict:
        return {"type": "sentencepiece", "model": base64.b64encode(self.model_proto).decode()}


def document_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The text's ids after the end-of-document id: how every document starts in training, so a
    prompt or scored document starts the same way. A model imported from HuggingFace starts one as
    transformers' tokenizer does when that puts a token first (LLaMA's begin-of-text)."""
    if isinstance(tokenizer, HuggingFaceTokenizer) and tokenizer.hf_template:
        ids, starts_with_special = tokenizer.encode_as_transformers(text)
        if starts_with_special:
            return ids
    else:
        ids = tokenizer.encode(text)
    start = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []  # an imported one may lack it
    return np.concatenate([start, ids]).astype(np.int32)


def prompt_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """A prompt's ids. For a model imported from HuggingFace, exactly transformers'
    `tokenizer(text).input_ids` (GPT-2's without a first token), so that greedy decoding continues
    as transformers' `generate` does; else, and for an empty prompt, `document_ids`."""
    if isinstance(tokenizer, HuggingFaceTokenizer) and tokenizer.hf_template and text:
        return tokenizer.encode_as_transformers(text)[0]
    return document_ids(tokenizer, text)


def _hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("a HuggingFace tokenizer.json needs the `tokenizers` package: "
                          "pip install tokenizers (or pip install -e '.[hf]')") from None
    return tokenizers


# Names of end-of-text tokens, tried when the files name none.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>")


class HuggingFaceTokenizer:
    """A HuggingFace `tokenizers` tokenizer, kept as its tokenizer.json text (self-contained).

    Encoding adds no special tokens (documents are separated by `eos_id` in the token stream);
    decoding keeps them unless asked (`skip_special_tokens`, for display), so that
    `decode(encode(text)) == text` for byte-level BPE. Ids that a tokenizer lacks are -1.
    `hf_template` (set for a model imported from HuggingFace): prompts and documents start as
    transformers' tokenizer starts them (see document_ids, prompt_ids).
    """

    def __init__(self, spec: str, bos_id: int = -1, eos_id: int = -1, pad_id: int = -1,
                 hf_template: bool = False, chat_template: str | None = None):
        self.spec = spec
        self._tok = _hf_tokenizers().Tokenizer.from_str(spec)
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.hf_template = hf_template
        self.chat_template = chat_template  # Jinja, from tokenizer_config.json (lm/chat.py)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, hf_template: bool = False
                        ) -> HuggingFaceTokenizer:
        """A tokenizer.json file, or a directory holding one (or GPT-2-era vocab.json and
        merges.txt, converted as transformers converts them); its special tokens come from the
        tokenizer_config.json, special_tokens_map.json, generation_config.json or config.json beside
        it (the first that names each), else from well-known end-of-text token names.

        `hf_template`: encode prompts as transformers' AutoTokenizer does, its add_bos_token and
        add_eos_token (tokenizer_config.json) applied over tokenizer.json's template."""
        path = fs.path(path)
        file = path / "tokenizer.json" if fs.is_dir(path) else path
        if file.name == "tokenizer.json" and not fs.is_file(file) and fs.is_file(
                file.parent / "merges.txt"):
            tokenizer = cls(_byte_level_bpe(file.parent))
        elif not fs.is_file(file):
            raise ConfigError(f"{file} does not exist")
        else:
            try:
                tokenizer = cls(fs.read_text(file))
            except Exception as e:  # the tokenizers library's parse error
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise ConfigError(f"{file} is not a HuggingFace tokenizer.json ({reason})") from None
        if hf_template:
            tokenizer._apply_transformers_template(file.parent)
        tokenizer.chat_template = _chat_template(file.parent)
        ids = _special_ids(file.parent, tokenizer._tok, tokenizer.vocab_size)
        if "eos" not in ids:
            found = [i for name in _EOS_NAMES if (i := tokenizer.token_to_id(name)) is not None]
            if found:
                ids["eos"] = found[0]
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id = (
            ids.get(k, -1) for k in ("bos", "eos", "pad"))
        return tokenizer

    def _apply_transformers_template(self, directory: fs.Path) -> None:
        """transformers replaces tokenizer.json's template when tokenizer_config.json sets
        add_bos_token or add_eos_token (TokenizersBackend.update_post_processor): so does this."""
        config = _read_json_or_empty(directory / "tokenizer_config.json")
        self.hf_template = True
        if "add_bos_token" not in config and "add_eos_token" not in config:
            return
        added = {}  # "bos"/"eos" -> the token's name, for those the template adds
        for key in ("bos", "eos"):
            name = _token_name(config.get(f"{key}_token"))
            if config.get(f"add_{key}_token") and name and self._tok.token_to_id(name) is not None:
                added[key] = name

        def sequence(text: str, type_id: int) -> list[str]:
            return ([f"{added['bos']}:{type_id}"] if "bos" in added else []) + [
                f"${text}:{type_id}"] + ([f"{added['eos']}:{type_id}"] if "eos" in added else [])

        self._tok.post_processor = _hf_tokenizers().processors.TemplateProcessing(
            single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1),
            special_tokens=[(n, self._tok.token_to_id(n)) for n in dict.fromkeys(added.values())])
        self.spec = self._tok.to_str()

    def encode_as_transformers(self, text: str) -> tuple[np.ndarray, bool]:
        """transformers' `tokenizer(text).input_ids` (the template's special tokens around the
        text's), and whether the template put a special token first."""
        encoding = self._tok.encode(text, add_special_tokens=True)
        # The mask marks the template's tokens only, not special tokens written in the text.
        first_is_template = bool(encoding.special_tokens_mask[:1] == [1])
        return np.asarray(encoding.ids, np.int32), first_is_template

    def special_ids(self) -> list[int]:
        """The ids of the tokenizer's added special tokens (end of turn, begin of text, ...)."""
        return [i for i, token in self._tok.get_added_tokens_decoder().items() if token.special]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32)
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids if 0 <= i < self.vocab_size],
                                skip_special_tokens=skip_special_tokens)

    def to_json(self) -> dict:
        spec = {"type": "huggingface", "tokenizer": self.spec, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "hf_template": self.hf_template}
        if self.chat_template:
            spec["chat_template"] = self.chat_template
        return spec


def _read_json_or_empty(path: fs.Path) -> dict:
    if not fs.is_file(path):
        return {}
    try:
        spec = json.loads(fs.read_text(path))
    except ValueError:
        return {}
    return spec if isinstance(spec, dict) else {}


def _chat_template(directory: fs.Path) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers 5 writes it), else
    tokenizer_config.json's `chat_template` (a template, or named ones: the `default`)."""
    if fs.is_file(directory / "chat_template.jinja"):
        return fs.read_text(directory / "chat_template.jinja")
    template = _read_json_or_empty(directory / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _token_name(token) -> str | None:
    """A special token as tokenizer_config.json names it: a string, or {"content": ...}."""
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def _byte_level_bpe(directory: fs.Path) -> str:
    """GPT-2-era vocab.json + merges.txt as a tokenizer.json, built as transformers' GPT2Tokenizer
    builds it: byte-level BPE, and as special tokens those tokenizer_config.json names (GPT-2's
    <|endoftext|> by default) and its added tokens."""
    tk = _hf_tokenizers()
    vocab = _read_json_or_empty(directory / "vocab.json")
    # A merge a line, "#version" first in most files
    merges = [tuple(line.split()) for line in fs.read_text(directory / "merges.txt").splitlines()
              if line.strip() and not line.startswith("#version")]
    if not vocab or any(len(merge) != 2 for merge in merges):
        raise ConfigError(f"{directory}: vocab.json and merges.txt are not a BPE tokenizer (a "
                          f"vocab.json mapping tokens to ids, and merges.txt lines of two tokens)")
    config = {**_read_json_or_empty(directory / "special_tokens_map.json"),
              **_read_json_or_empty(directory / "tokenizer_config.json")}
    tok = tk.Tokenizer(tk.models.BPE(vocab, merges, continuing_subword_prefix="",
                                     end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(
        add_prefix_space=bool(config.get("add_prefix_space", False)))
    tok.decoder = tk.decoders.ByteLevel()
    names = [_token_name(config.get(f"{key}_token", "<|endoftext|>" if key != "pad" else None))
             for key in ("bos", "eos", "unk", "pad")]
    names += [_token_name(t) for t in (config.get("added_tokens_decoder") or {}).values()]
    names += list(_read_json_or_empty(directory / "added_tokens.json"))
    tok.add_special_tokens([tk.AddedToken(n, special=True, normalized=False)
                            for n in dict.fromkeys(names) if n is not None and n in vocab])
    return tok.to_str()


def _special_ids(directory: fs.Path, tok, vocab_size: int) -> dict[str, int]:
    """bos/eos/pad ids named by the HuggingFace files in `directory`, first file first."""
    def read(name: str) -> dict:
        return _read_json_or_empty(directory / name)

    ids: dict[str, int] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        spec = read(name)
        for key in ("bos", "eos", "pad"):
            token = _token_name(spec.get(f"{key}_token"))
            if key not in ids and token is not None and tok.token_to_id(token) is not None:
                ids[key] = tok.token_to_id(token)
    for name in ("generation_config.json", "config.json"):
        spec = read(name)
        for key in ("bos", "eos", "pad"):
            value = spec.get(f"{key}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if key not in ids and isinstance(value, int) and 0 <= value < vocab_size:
                ids[key] = value
    return ids


# Sentencepiece drops longer "sentences" silently, so long lines are fed in pieces of this size.
MAX_SENTENCE_CHARS = 4096


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                yield line[start:start + MAX_SENTENCE_CHARS]


def sample_lines(lines: Iterable[str], size: int, seed: int = 0) -> list[str]:
    """A uniform sample of at most `size` of `lines` (a stream of any length), in stream order:
    a reservoir (Li's algorithm L: random draws only where a line enters it), seeded."""
    rng = random.Random(seed)
    reservoir: list[tuple[int, str]] = []
    weight, next_index = 1.0, size
    for index, line in enumerate(lines):
        if index < size:
            reservoir.append((index, line))
            if index == size - 1:
                weight = math.exp(math.log(rng.random()) / size)
                next_index = size + int(math.log(rng.random()) / math.log1p(-weight))
        elif index == next_index:
            reservoir[rng.randrange(size)] = (index, line)
            weight *= math.exp(math.log(rng.random()) / size)
            next_index += 1 + int(math.log(rng.random()) / math.log1p(-weight))
    return [line for _, line in sorted(reservoir)]


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = "bpe",
                        character_coverage: float = 0.9995,
                        user_defined_symbols: Sequence[str] = (),
                        max_sentences: int = 5_000_000, verbose: bool = False
                        ) -> SentencePieceTokenizer:
    """Train on `texts` (documents, a stream of any length). Ids: 0 unk, 1 bos, 2 eos, 3 pad, then
    the user's symbols.

    At most `max_sentences` lines, sampled uniformly from the stream by a seeded reservoir, are
    kept, so a corpus larger than memory trains the same way; fewer lines are all used, in order.
    """
    import io

    model = io.BytesIO()
    sentences = sample_lines(_sentences(texts), max_sentences)
    spm.set_random_generator_seed(0)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            user_defined_symbols=list(user_defined_symbols), input_sentence_size=max_sentences,
            shuffle_input_sentence=True, max_sentence_length=4 * MAX_SENTENCE_CHARS,
            minloglevel=0 if verbose else 2)
    except RuntimeError as e:
        reason = str(e).split("]")[-1].strip()
        raise ConfigError(f"sentencepiece cannot train a vocabulary of {vocab_size} on this "
                          f"corpus: {reason}") from None
    return SentencePieceTokenizer(model.getvalue())


def fit_tokenizer(kind: str, texts: Iterable[str]) -> Tokenizer:
    """`char`, `byte`, `train:N` (sentencepiece of N pieces on `texts`), a `.model` path, or a
    `.json` path: an lm tokenizer.json (a workdir's, e.g. `python -m lm.hf import`'s) or a
    HuggingFace one."""
    if kind == "char":
        return CharTokenizer.fit(texts)
    if kind == "byte":
        return ByteTokenizer()
    if kind.startswith("train:"):
        return train_sentencepiece(texts, int(kind.split(":", 1)[1]))
    if kind.endswith(".json"):
        return load(kind)
    return SentencePieceTokenizer.from_file(kind)


def from_json(spec: dict) -> Tokenizer:
    if spec["type"] == "sentencepiece":
        return SentencePieceTokenizer(base64.b64decode(spec["model"]))
    if spec["type"] == "huggingface":
        return HuggingFaceTokenizer(spec["tokenizer"], spec["bos_id"], spec["eos_id"],
                                    spec["pad_id"], spec.get("hf_template", False),
                                    spec.get("chat_template"))
    return CharTokenizer(spec["chars"]) if spec["type"] == "char" else ByteTokenizer()


def save(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    fs.write_text(path, json.dumps(tokenizer.to_json(), ensure_ascii=False))


def load(path: str | os.PathLike) -> Tokenizer:
    """An lm tokenizer.json; a HuggingFace tokenizer.json (no "type" field) is wrapped as is."""
    if not fs.is_file(path):
        raise ConfigError(f"tokenizer {path} does not exist")
    try:
        spec = json.loads(fs.read_text(path))
    except ValueError as e:
        raise ConfigError(f"tokenizer {path} is not JSON ({e})") from None
    if isinstance(spec, dict) and "type" not in spec and "model" in spec:
        return HuggingFaceTokenizer.from_pretrained(path)
    return from_json(spec)


def main(argv: list[str]) -> None:
    from absl import flags

    f = flags.FLAGS
    try:
        files = sorted(p for pattern in f.input for p in fs.expand(pattern))
        if not files:
            raise ConfigError(f"--input={','.join(f.input)} matches no files")
        from lm import sources

        # A stream of pieces, never a whole file in memory; gzip and zstd files are decompressed.
        texts = (piece for p in files for piece in sources.text_pieces(p, errors="replace"))
        print(f"training a {f.model_type} model of {f.vocab_size} pieces on {len(files)} files "
              f"(at most {f.max_sentences:,} lines, sampled)", flush=True)
        tokenizer = train_sentencepiece(texts, f.vocab_size, f.model_type, f.character_coverage,
                                        f.user_defined_symbols, f.max_sentences, verbose=True)
        out = fs.path(f.model_prefix + ".model")
        fs.makedirs(out.parent)
        fs.write_bytes(out, tokenizer.model_proto)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: vocab {tokenizer.vocab_size}, bos {tokenizer.bos_id}, eos "
          f"{tokenizer.eos_id}, pad {tokenizer.pad_id}; use it with "
          f"--config.data.tokenizer={out}")


def run(argv: list[str] | None = None) -> None:
    """The binary, from Python too: `run(["lm.tokenizer", "--input=...", "--model_prefix=..."])`
    (default: sys.argv); its flags are defined here, not on import."""
    from absl import app, flags

    flags.DEFINE_list("input", None, "Text files or globs (comma-separated).", required=True)
    flags.DEFINE_string("model_prefix", None, "Writes PREFIX.model.", required=True)
    flags.DEFINE_integer("vocab_size", 8000, "Number of pieces.")
    flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "Sentencepiece algorithm.")
    flags.DEFINE_float("character_coverage", 0.9995, "Share of characters kept as pieces; the "
                       "rest fall back to bytes (lower it for large alphabets only if needed).")
    flags.DEFINE_list("user_defined_symbols", [], "Special tokens that are never split.")
    flags.DEFINE_integer("max_sentences", 5_000_000, "Lines sampled for training, at most.")
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
