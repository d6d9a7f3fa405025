"""Inputs -> documents: text files, jsonl, gzip of either, or a built-in corpus; the train/val split.

`config.data.path` is a file, directory or glob (comma-separated), or `builtin:python_docs` (CPython's
own reference documentation and stdlib docstrings, present wherever Python is, so the quickstart
needs no download). A text file is one document; a `.jsonl` file holds one per line, in
`config.data.text_field`. With `config.data.format="prompt_completion"` every jsonl line is an
example, a (prompt, completion) pair from `config.data.prompt_field` and `completion_field`; with
`chat`, a conversation (lm/chat.py) from `config.data.messages_field`.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import json
import os
import sysconfig
import zlib
from pathlib import Path
from typing import Union

import numpy as np
from ml_collections import ConfigDict

from lm import fs
from lm.chat import Chat
from lm.config import ConfigError

BUILTIN = "builtin:"
Example = tuple[str, str]  # (prompt, completion)
Document = Union[str, Example, Chat]


@functools.cache  # a run reads it twice (to hash and to tokenize); parsing the stdlib takes seconds
def python_docs() -> list[str]:
    """The pydoc topics (language reference) and the docstrings of the stdlib's top-level modules."""
    import pydoc_data.topics

    docs = [text for _, text in sorted(pydoc_data.topics.topics.items())]
    for source in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a stdlib file this parser cannot read contributes nothing
        docs += [doc for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                      ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node))]
    return docs


_BUILTINS = {"python_docs": python_docs}


def expand(path: str) -> list[str]:
    """The files `path` names, local or in a bucket, in a fixed order; a part matching nothing is
    an error."""
    files: list[str] = []
    for part in filter(None, (p.strip() for p in path.split(","))):
        matches = fs.expand(part)
        if not matches:
            where = "" if fs.is_remote(part) else f" (cwd {os.getcwd()})"
            raise ConfigError(f"config.data.path={part!r} matches no files{where}; pass an "
                              f"existing file, directory or glob with --config.data.path")
        files += matches
    return files


def _kind(file: str) -> str:
    """`jsonl` or `text`, by the name without a trailing `.gz`."""
    name = file[:-3] if file.endswith(".gz") else file
    return "jsonl" if name.endswith(".jsonl") else "text"


def _read_text(file: str) -> str:
    raw = fs.read_bytes(file)
    where = ""
    if file.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ConfigError(f"{file}: not a readable gzip file ({e}); re-compress it or leave it "
                              f"out of config.data.path") from None
        where = " of the decompressed data"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{file}: not UTF-8 text (byte offset {e.start}{where}); convert it or "
                          f"leave it out of config.data.path") from None


def _field(record: dict, name: str, file: str, line: int, setting: str) -> str:
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise ConfigError(f"{file}:{line}: no string field {name!r}; fix the line or set "
                          f"config.data.{setting} to the field that holds the text")
    return value


def _chat(record: dict, name: str, where: str) -> Chat:
    """A conversation: a non-empty list of {"role": str, "content": str} (other keys ignored)."""
    messages = record.get(name) if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: no list of messages in field {name!r}; fix the line or set "
                          f"config.data.messages_field to the field that holds the conversation")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ConfigError(f"{where}: message {i} is not {{\"role\": text, \"content\": text}}; "
                              f"fix the line")
    return Chat(tuple((m["role"], m["content"]) for m in messages))


def _read_jsonl(file: str, data: ConfigDict) -> list[Document]:
    docs: list[Document] = []
    for number, line in enumerate(_read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}:{number}: not JSON ({e.msg} at column {e.colno}); fix or "
                              f"remove the line") from None
        if data.format == "prompt_completion":
            docs.append((_field(record, data.prompt_field, file, number, "prompt_field"),
                         _field(record, data.completion_field, file, number, "completion_field")))
        elif data.format == "chat":
            docs.append(_chat(record, data.messages_field, f"{file}:{number}"))
        else:
            docs.append(_field(record, data.text_field, file, number, "text_field"))
    return docs


def read_documents(data: ConfigDict) -> list[Document]:
    """The documents (texts, or (prompt, completion) examples) that `data.path` names."""
    if data.path.startswith(BUILTIN):
        name = data.path[len(BUILTIN):]
        if name not in _BUILTINS:
            raise ConfigError(f"config.data.path={data.path!r}: unknown built-in corpus; "
                              f"available: {', '.join(BUILTIN + n for n in _BUILTINS)}")
        if data.format != "text":
            raise ConfigError(f"config.data.path={data.path!r} is text, not {data.format} "
                              f"examples; set config.data.format=text")
        return _BUILTINS[name]()
    docs: list[Document] = []
    for file in expand(data.path):
        if _kind(file) == "jsonl":
            docs += _read_jsonl(file, data)
        elif data.format != "text":
            what, fields = (("prompt/completion examples",
                             f"{data.prompt_field!r} and {data.completion_field!r}")
                            if data.format == "prompt_completion" else
                            ("chat conversations", repr(data.messages_field)))
            raise ConfigError(f"{file}: {what} must be .jsonl (or .jsonl.gz) lines with "
                              f"{fields}; leave it out of config.data.path or set "
                              f"config.data.format=text")
        else:
            docs.append(_read_text(file))
    docs = [d for d in docs if d]  # an empty text would be a lone end-of-document id
    if not any(texts(docs)):
        raise ConfigError(f"config.data.path={data.path!r}: the corpus is empty")
    return docs


def texts(docs: list[Document]) -> list[str]:
    """Every string the documents hold: what a tokenizer is fitted on."""
    return [t for d in docs for t in ((d,) if isinstance(d, str) else
                                      [c for _, c in d.messages] if isinstance(d, Chat) else d)]


def input_hash(data: ConfigDict) -> str:
    """A content hash of the inputs: each file's kind and bytes, in order (names do not matter).

    Hashing costs one read of the input, far less than tokenizing it; a built-in corpus hashes its
    documents.
    """
    digest = hashlib.sha256()
    if data.path.startswith(BUILTIN):
        digest.update(data.path.encode())
        for doc in read_documents(data):
            digest.update(hashlib.sha256(doc.encode()).digest())
        return digest.hexdigest()
    for file in expand(data.path):
        file_digest = hashlib.sha256()
        with fs.errors(file), fs.path(file).open("rb") as f:
            while block := f.read(1 << 24):
                file_digest.update(block)
        digest.update(f"{_kind(file)} {file.endswith('.gz')} ".encode() + file_digest.digest())
    return digest.hexdigest()


def split_documents(docs: list[Document], val_fraction: float, seed: int
                    ) -> tuple[list[Document], list[Document]]:
    """Hold out whole documents; fewer than 10 texts hold out each one's tail instead.

    The tail rule makes a single file split like nanoGPT's (the last 10% of Tiny Shakespeare).
    Examples are never cut: a prompt without its completion would be no example.
    """
    if val_fraction == 0:
        return docs, []
    if len(docs) < 10 and all(isinstance(d, str) for d in docs):
        cuts = [int(len(d) * (1 - val_fraction)) for d in docs]
        return [d[:c] for d, c in zip(docs, cuts)], [d[c:] for d, c in zip(docs, cuts) if d[c:]]
    order = np.random.default_rng(seed).permutation(len(docs))
    held_out = set(order[:max(1, round(len(docs) * val_fraction))].tolist())
    return ([d for i, d in enumerate(docs) if i not in held_out],
            [d for i, d in enumerate(docs) if i in held_out])
