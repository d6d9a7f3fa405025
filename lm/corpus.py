"""Documents and the train/validation split.

Every document is held out for validation by a seeded hash of its first bytes
(`sources.key_bytes`), with probability `config.data.val_fraction`: a document lands in the same
split whichever file, task, worker or host reads it, duplicates land together, and no pass over the
corpus decides anything. A corpus of fewer than 10 texts (a single text file, say) holds out each
one's tail instead, the last `val_fraction` of its UTF-8 bytes (from a character boundary), so one
file splits like nanoGPT's (the last 10% of Tiny Shakespeare). Examples are never cut.

`read_documents` and `split_documents` hold a corpus in memory, for small ones (evaluation, tests);
`lm.prepare` streams the same documents and the same split.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Iterator

from ml_collections import ConfigDict

from lm import sources
from lm.config import ConfigError
from lm.sources import BUILTIN, Chat, Document, Example, Part, Piece  # noqa: F401  (public names)

TAIL_RULE_TEXTS = 10  # fewer texts than this: each one's tail is held out


def held_out(key: bytes, val_fraction: float, seed: int) -> bool:
    """The split of the document whose first bytes are `key`: a seeded hash, uniform in [0, 1),
    below val_fraction."""
    digest = hashlib.blake2b(key, digest_size=8, person=b"lm-split", salt=(
        seed % 2**64).to_bytes(8, "little") + bytes(8)).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def tail_cut(text: bytes, val_fraction: float) -> int:
    """Where the held-out tail of a text starts: the last val_fraction of its bytes, from the
    next character boundary."""
    cut = int(len(text) * (1 - val_fraction))
    while cut < len(text) and text[cut] & 0xC0 == 0x80:
        cut += 1
    return cut


def _split(piece_key: bytes, val_fraction: float, seed: int) -> str:
    return "val" if held_out(piece_key, val_fraction, seed) else "train"


def split_pieces(part: Part, data: ConfigDict, seed: int, tails: bool
                 ) -> Iterator[tuple[str, Piece]]:
    """(split, piece) for every piece of `part`. With `tails`, a text file's head and tail come
    as parts of their own (the plan cuts them); any other document is cut here."""
    split = ""
    for piece in sources.pieces(part, data):
        if tails and not piece.split:
            text = piece.content.encode("utf-8")
            cut = tail_cut(text, data.val_fraction)
            for name, half in (("train", text[:cut]), ("val", text[cut:])):
                if half:
                    yield name, Piece(half.decode("utf-8"), True)
            continue
        if piece.split:
            split = piece.split
        elif piece.key is not None:
            split = _split(piece.key, data.val_fraction, seed)
        yield split, piece


def count_documents(inputs: list[sources.Input], data: ConfigDict, limit: int) -> int:
    """How many non-empty documents the inputs hold, counting no further than `limit`: a plain
    text file counts without being read, so this costs a few reads."""
    count = 0
    for input in inputs:
        if input.kind == "text" and not input.compression:
            count += input.size > 0
        elif input.kind == "text":
            count += any(p.content for p in sources.pieces(Part(input), data))
        else:
            count += sum(1 for _ in itertools.islice(sources.documents(Part(input), data),
                                                     limit - count))
        if count >= limit:
            break
    return count


def uses_tails(inputs: list[sources.Input], data: ConfigDict) -> bool:
    """Whether the split holds out each text's tail (fewer than 10 texts) rather than whole
    documents; an empty corpus is an error here, before anything is written."""
    count = count_documents(inputs, data, TAIL_RULE_TEXTS)
    if not count:
        raise ConfigError(f"config.data.path={data.path!r}: the corpus is empty")
    return data.format == "text" and data.val_fraction > 0 and count < TAIL_RULE_TEXTS


def read_documents(data: ConfigDict) -> list[Document]:
    """The documents (texts, (prompt, completion) examples or chats) that `data.path` names, in
    memory: for small corpora. A text file comes whole."""
    docs: list[Document] = []
    for input in sources.inputs(data):
        if input.kind != "text":
            docs += sources.documents(Part(input), data)
            continue
        text = "".join(p.content for p in sources.pieces(Part(input), data))
        if text:
            docs.append(text)
    if not any(texts(docs)):
        raise ConfigError(f"config.data.path={data.path!r}: the corpus is empty")
    return docs


def texts(docs: list[Document]) -> list[str]:
    """Every string the documents hold: what a tokenizer is fitted on."""
    return [t for d in docs for t in sources.strings(d)]


def split_documents(docs: list[Document], val_fraction: float, seed: int
                    ) -> tuple[list[Document], list[Document]]:
    """(train, validation) documents, as `lm.prepare` splits them (the module's docstring)."""
    if val_fraction == 0:
        return docs, []
    if len(docs) < TAIL_RULE_TEXTS and all(isinstance(d, str) for d in docs):
        train, val = [], []
        for doc in docs:
            text = doc.encode("utf-8")
            cut = tail_cut(text, val_fraction)
            train += [text[:cut].decode("utf-8")] if cut else []
            val += [text[cut:].decode("utf-8")] if cut < len(text) else []
        return train, val
    held = [held_out(sources.key_bytes(d), val_fraction, seed) for d in docs]
    return ([d for d, h in zip(docs, held) if not h], [d for d, h in zip(docs, held) if h])
