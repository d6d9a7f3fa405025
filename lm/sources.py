"""Inputs -> documents, streamed: the files `config.data.path` names, each format's reader, and
bad input named by its place (`file:line`, `file:row-group N`).

`config.data.path` is a file, directory or glob (comma-separated; local, gs:// or s3://), a built-in
corpus (`builtin:python_docs`), or a HuggingFace hub dataset (`hf:NAME?config=C&split=S`). Files:

    *.jsonl              one record per line (JSON)
    *.parquet            one record per row, read by row groups (pyarrow)
    *.arrow              one record per row: the files `datasets.save_to_disk` writes (pyarrow)
    *.gz, *.zst          gzip or zstd of a text or jsonl file, by the name inside (a.jsonl.zst)
    any other name       the whole file is one document (UTF-8 text)

A record becomes a document through `config.data.format` (`FORMATS`: one small function each: a
text, a (prompt, completion) example, or a chat conversation, lm/chat.py). A
reader never holds more than a piece of text (`PIECE_BYTES`) or a record batch: a long text file
comes as pieces cut after a newline, so no token spans a cut, and memory does not grow with a file.
A `Part` is what one task reads: a whole file, a line-aligned byte range of a plain one, or a range
of a parquet file's row groups.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
import urllib.parse
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from ml_collections import ConfigDict

from lm import fs
from lm.chat import Chat
from lm.config import ConfigError

BUILTIN = "builtin:"
HUB = "hf:"
PIECE_BYTES = 1 << 20   # text handed on at once; a longer document comes in pieces cut after newlines
KEY_BYTES = 1 << 16     # a document's first bytes: what names it (for the train/validation split)
Example = tuple[str, str]  # (prompt, completion)
Document = Union[str, Example, Chat]
# Files that `datasets.save_to_disk` writes beside its .arrow files: metadata, not documents.
ARROW_METADATA = ("state.json", "dataset_info.json", "dataset_dict.json")
EXTRAS = 'pip install -e ".[data]"'


@dataclasses.dataclass(frozen=True)
class Piece:
    """Text of one document (or a whole example); `key` is set on a document's first piece (and on
    the first piece of a part that starts inside one): the document's first KEY_BYTES of UTF-8."""
    content: Document
    end: bool                 # the document ends with this piece
    key: bytes | None = None
    split: str = ""           # "train"/"val" where the input fixes it (a held-out tail), else ""


@dataclasses.dataclass(frozen=True)
class Input:
    """One input file and what identifies its bytes cheaply: size and modification time (a
    bucket object's generation or ETag)."""
    path: str
    kind: str                 # text | jsonl | parquet | arrow | builtin | hub
    compression: str          # "" | gz | zst
    size: int
    version: str


@dataclasses.dataclass(frozen=True)
class Part:
    """What one task reads of an input: plain files by bytes [start, stop) moved to line starts,
    inside the document [doc_start, doc_stop) (a whole file, or its head or held-out tail);
    parquet files by row groups [start, stop); anything else whole (stop -1)."""
    input: Input
    start: int = 0
    stop: int = -1
    doc_start: int = 0
    doc_stop: int = -1
    split: str = ""           # the split of this part's document, when the input fixes it


# ---------------------------------------------------------------------------------------------
# Which inputs.

@functools.cache  # parsing the stdlib takes seconds
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
    an error. A `datasets.save_to_disk` folder's metadata files are left out."""
    files: list[str] = []
    for part in filter(None, (p.strip() for p in path.split(","))):
        matches = fs.expand(part)
        if not matches:
            where = "" if fs.is_remote(part) else f" (cwd {os.getcwd()})"
            raise ConfigError(f"config.data.path={part!r} matches no files{where}; pass an "
                              f"existing file, directory or glob with --config.data.path")
        if any(os.path.basename(f) == "dataset_dict.json" for f in matches):
            raise ConfigError(f"config.data.path={part!r} holds a `datasets` DatasetDict (several "
                              f"splits); pass the folder of the split to train on, e.g. "
                              f"{part.rstrip('/')}/train")
        arrow_dirs = {os.path.dirname(f) for f in matches if f.endswith(".arrow")}
        files += [f for f in matches if not (os.path.basename(f) in ARROW_METADATA
                                             and os.path.dirname(f) in arrow_dirs)]
    return files


def compression(file: str) -> str:
    return next((c for c, ends in (("gz", ".gz"), ("zst", (".zst", ".zstd")))
                 if file.endswith(ends)), "")


def kind(file: str) -> str:
    """`jsonl`, `parquet`, `arrow` or `text`, by the name without a compression suffix."""
    name = file[:file.rindex(".")] if compression(file) else file
    return next((k for k in ("jsonl", "parquet", "arrow") if name.endswith("." + k)), "text")


def _stat(file: str) -> tuple[int, str]:
    if not fs.is_remote(file):
        with fs.errors(file):
            st = os.stat(file)
        return st.st_size, str(st.st_mtime_ns)
    with fs.errors(file):
        info = fs.filesystem(file).info(file)
    return int(info["size"]), fs.object_version(info)


def _check_format(file: str, data: ConfigDict) -> None:
    if data.format != "text" and kind(file) == "text":
        raise ConfigError(f"{file}: {data.format} records must come from .jsonl, .parquet or "
                          f".arrow files (compressed jsonl too), not a plain text file; leave it "
                          f"out of config.data.path or set config.data.format=text")
    if kind(file) in ("parquet", "arrow") and compression(file):
        raise ConfigError(f"{file}: {kind(file)} files compress internally; decompress it")


def inputs(data: ConfigDict) -> list[Input]:
    """What `data.path` names, each with its size and version (a listing, no reads)."""
    path = data.path
    if path.startswith(BUILTIN):
        name = path[len(BUILTIN):]
        if name not in _BUILTINS:
            raise ConfigError(f"config.data.path={path!r}: unknown built-in corpus; "
                              f"available: {', '.join(BUILTIN + n for n in _BUILTINS)}")
        if data.format != "text":
            raise ConfigError(f"config.data.path={path!r} is text, not {data.format} records; "
                              f"set config.data.format=text")
        # Its text is the Python version's: the version names it.
        version = hashlib.sha256(sys.version.encode()).hexdigest()[:16]
        return [Input(path, "builtin", "", 0, version)]
    if path.startswith(HUB):
        return [Input(path, "hub", "", 0, "")]
    found = []
    for file in expand(path):
        _check_format(file, data)
        found.append(Input(file, kind(file), compression(file), *_stat(file)))
    return found


# ---------------------------------------------------------------------------------------------
# Records -> documents: one function per config.data.format.

def _field(record: Any, name: str, where: Callable[[], str], setting: str) -> str:
    value = record.get(name) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise ConfigError(f"{where()}: no string field {name!r}; fix the record or set "
                          f"config.data.{setting} to the field that holds the text")
    return value


# Each format: the record's fields it reads, and the document it makes of a record (`where` names
# the record's place, for errors: it may cost a read, so it is called only then).
def text_document(record: Any, data: ConfigDict, where: Callable[[], str]) -> Document:
    return _field(record, data.text_field, where, "text_field")


def prompt_completion_document(record: Any, data: ConfigDict, where: Callable[[], str]
                               ) -> Document:
    return (_field(record, data.prompt_field, where, "prompt_field"),
            _field(record, data.completion_field, where, "completion_field"))


def chat_document(record: Any, data: ConfigDict, where: Callable[[], str]) -> Document:
    """A conversation: a non-empty list of {"role": text, "content": text} (other keys ignored)."""
    messages = record.get(data.messages_field) if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where()}: no list of messages in field {data.messages_field!r}; fix "
                          f"the record or set config.data.messages_field to the field that holds "
                          f"the conversation")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ConfigError(f"{where()}: message {i} is not {{\"role\": text, \"content\": "
                              f"text}}; fix the record")
    return Chat(tuple((m["role"], m["content"]) for m in messages))


FORMATS: dict[str, tuple[Callable[[ConfigDict], list[str]], Callable[..., Document]]] = {
    "text": (lambda data: [data.text_field], text_document),
    "prompt_completion": (lambda data: [data.prompt_field, data.completion_field],
                          prompt_completion_document),
    "chat": (lambda data: [data.messages_field], chat_document),
}


def strings(doc: Document) -> tuple[str, ...]:
    """The strings a document holds: a text, an example's prompt and completion, a conversation's
    roles and contents."""
    return (doc,) if isinstance(doc, str) else doc.texts() if isinstance(doc, Chat) else doc


def key_bytes(doc: Document) -> bytes:
    """What names a document for the split: its first KEY_BYTES of UTF-8 (an example's or a
    conversation's strings NUL-separated)."""
    return "\0".join(strings(doc)).encode("utf-8")[:KEY_BYTES]


# ---------------------------------------------------------------------------------------------
# Byte streams: local or bucket files, decompressed; UTF-8 pieces cut after newlines.

def _optional(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs the `{module}` package: {EXTRAS}") from None


def _zstd_chunks(raw: io.BufferedIOBase, file: str) -> Iterator[bytes]:
    """A zstd file's decompressed bytes, frame after frame; a file cut short is an error (the
    library's stream reader would end quietly)."""
    zstandard = _optional("zstandard", f"{file} (zstd)")
    decoder, started = zstandard.ZstdDecompressor().decompressobj(), False
    try:
        while block := raw.read(PIECE_BYTES):
            while block:
                yield decoder.decompress(block)
                started = True
                block = decoder.unused_data if decoder.eof else b""
                if decoder.eof:
                    decoder, started = zstandard.ZstdDecompressor().decompressobj(), False
    except zstandard.ZstdError as e:
        raise ConfigError(f"{file}: not a readable zstd file ({e}); re-compress it or leave it "
                          f"out of config.data.path") from None
    if started:
        raise ConfigError(f"{file}: not a readable zstd file (it ends inside a frame: truncated); "
                          f"re-compress it or leave it out of config.data.path")


def _gzip_chunks(raw: io.BufferedIOBase, file: str) -> Iterator[bytes]:
    try:
        with gzip.GzipFile(fileobj=raw) as f:
            while block := f.read(PIECE_BYTES):
                yield block
    except (OSError, EOFError, zlib.error) as e:
        raise ConfigError(f"{file}: not a readable gzip file ({e}); re-compress it or leave it "
                          f"out of config.data.path") from None


def _window(chunks: Iterator[bytes], start: int, stop: int) -> Iterator[bytes]:
    """The bytes [start, stop) of a stream of chunks (stop -1: to its end)."""
    position = 0
    for chunk in chunks:
        begin, position = position, position + len(chunk)
        if position <= start:
            continue
        yield chunk[max(start - begin, 0):len(chunk) if stop < 0 else stop - begin]
        if 0 <= stop <= position:
            return


def _byte_chunks(input: Input, start: int = 0, stop: int = -1) -> Iterator[bytes]:
    """The bytes [start, stop) of `input` (decompressed; stop -1: to the end). A plain file is
    read from `start` on; a compressed one is decompressed from its beginning."""
    with fs.errors(input.path), fs.path(input.path).open("rb") as raw:
        if input.compression:
            chunks = (_gzip_chunks if input.compression == "gz" else _zstd_chunks)(raw, input.path)
            yield from _window(chunks, start, stop)
            return
        raw.seek(start)
        left = (input.size if stop < 0 else stop) - start
        while left > 0 and (block := raw.read(min(PIECE_BYTES, left))):
            left -= len(block)
            yield block


def text_pieces(file: str, errors: str = "strict") -> Iterator[str]:
    """A text file's (decompressed) text in pieces cut after newlines: for tools that read text
    files whole, one piece in memory at a time."""
    input = Input(file, "text", compression(file), *_stat(file))
    for _, raw in _pieces(_byte_chunks(input), whole_lines=False):
        yield raw.decode("utf-8", errors)


def decompressed_size(input: Input) -> int:
    """Bytes of `input`'s text: its size, or one pass of decompression."""
    return sum(map(len, _byte_chunks(input))) if input.compression else input.size


def _cut(buffer: bytes, whole_lines: bool) -> int:
    """Where a piece of `buffer` ends: after its last newline; without one, before its last
    character (a line longer than a piece), or nowhere (0) when whole lines are needed."""
    newline = buffer.rfind(b"\n")
    if newline >= 0 or whole_lines:
        return newline + 1
    lead = len(buffer) - 1
    while lead > 0 and buffer[lead] & 0xC0 == 0x80:  # UTF-8 continuation bytes
        lead -= 1
    return lead or len(buffer)


def _pieces(chunks: Iterator[bytes], whole_lines: bool) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of about PIECE_BYTES, each ending after a newline (see `_cut`)."""
    buffer, offset = b"", 0
    for chunk in chunks:
        buffer += chunk
        if len(buffer) < PIECE_BYTES:
            continue
        cut = _cut(buffer, whole_lines)
        if cut:
            yield offset, buffer[:cut]
            buffer, offset = buffer[cut:], offset + cut
    if buffer:
        yield offset, buffer


def _decode(piece: bytes, offset: int, input: Input) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as e:
        where = " of the decompressed data" if input.compression else ""
        raise ConfigError(f"{input.path}: not UTF-8 text (byte offset {offset + e.start}{where}); "
                          f"convert it or leave it out of config.data.path") from None


def _line_start(input: Input, position: int, floor: int, ceiling: int) -> int:
    """The first line start at or after `position` (a line starting exactly there counts), within
    [floor, ceiling]: where a part of a plain file begins, and the part before it ends."""
    if position <= floor:
        return floor
    offset = position - 1
    for block in _byte_chunks(input, offset, ceiling):
        newline = block.find(b"\n")
        if newline >= 0:
            return min(offset + newline + 1, ceiling)
        offset += len(block)
    return ceiling


def _bounds(part: Part) -> tuple[int, int, int]:
    """(begin, end, document end) of what a text or jsonl part reads: bytes moved to line starts
    inside its document; -1 for "to the end" of a compressed file read whole."""
    doc_stop = part.doc_stop if part.doc_stop >= 0 else (
        -1 if part.input.compression else part.input.size)
    if doc_stop < 0:
        return 0, -1, -1
    stop = doc_stop if part.stop < 0 else min(part.stop, doc_stop)
    begin = _line_start(part.input, part.start, part.doc_start, doc_stop)
    end = doc_stop if stop >= doc_stop else _line_start(part.input, stop, part.doc_start, doc_stop)
    return begin, end, doc_stop


# ---------------------------------------------------------------------------------------------
# Readers: a part -> pieces.

def _text_pieces(part: Part) -> Iterator[Piece]:
    """A text file's document (or its head or tail) in pieces. The first piece carries the key:
    the document's first KEY_BYTES, read from its start whichever part this is."""
    input = part.input
    begin, end, doc_stop = _bounds(part)
    key = None
    if not part.split:
        head_stop = part.doc_start + KEY_BYTES
        key = b"".join(_byte_chunks(input, part.doc_start,
                                    head_stop if doc_stop < 0 else min(head_stop, doc_stop)))
    previous = None
    for offset, raw in _pieces(_byte_chunks(input, begin, end), whole_lines=False):
        if previous is not None:
            yield Piece(previous, False, key, part.split)
            key = None
        previous = _decode(raw, begin + offset, input)
    if previous is not None:
        yield Piece(previous, end == doc_stop, key, part.split)


def _line_number(input: Input, begin: int, offset: int, text: str, index: int) -> int:
    """The line number (from 1) of line `index` of a piece at `offset` of a part from `begin`."""
    before = sum(block.count(b"\n") for block in _byte_chunks(input, 0, begin + offset)) \
        if not input.compression else 0
    return before + text.count("\n", 0, index) + 1


def _jsonl_records(part: Part) -> Iterator[tuple[Any, Callable[[], str]]]:
    input = part.input
    plain = not input.compression
    begin, end, _ = _bounds(part)
    lines_before = 0  # within this part (compressed files are read whole)
    for offset, raw in _pieces(_byte_chunks(input, begin, end), whole_lines=True):
        text = _decode(raw, begin + offset, input)
        position = 0
        for line in text.split("\n"):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    number = (_line_number(input, begin, offset, text, position) if plain
                              else lines_before + text.count("\n", 0, position) + 1)
                    raise ConfigError(f"{input.path}:{number}: not JSON ({e.msg} at column "
                                      f"{e.colno}); fix or remove the line") from None

                def where(position=position, offset=offset, text=text) -> str:
                    number = (_line_number(input, begin, offset, text, position) if plain
                              else lines_before + text.count("\n", 0, position) + 1)
                    return f"{input.path}:{number}"
                yield record, where
            position += len(line) + 1
        lines_before += text.count("\n")


@contextlib.contextmanager
def _arrow_errors(file: str, where: str = "") -> Iterator[None]:
    """pyarrow's errors (and the OSErrors it raises for damaged data) as one line naming the
    file and the row group or record batch."""
    pa = _optional("pyarrow", file)
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        what = "parquet" if kind(file) == "parquet" else "arrow"
        raise ConfigError(f"{file}{where}: not a readable {what} file ({fs.first_line(e)}); "
                          f"rewrite it or leave it out of config.data.path") from None


def _columns(schema_names: list[str], fields: list[str], file: str, data: ConfigDict) -> None:
    missing = [f for f in fields if f not in schema_names]
    if missing:
        setting = {data.text_field: "text_field", data.prompt_field: "prompt_field",
                   data.completion_field: "completion_field",
                   data.messages_field: "messages_field"}[missing[0]]
        raise ConfigError(f"{file}: no column {missing[0]!r} (it has {', '.join(schema_names)}); "
                          f"set config.data.{setting} to the column that holds the text")


def _batch_records(batch, fields: list[str], where: str, first_row: int = 0
                   ) -> Iterator[tuple[Any, Callable]]:
    columns = [batch.column(f).to_pylist() for f in fields]
    for row, values in enumerate(zip(*columns), first_row):
        yield dict(zip(fields, values)), (lambda row=row: f"{where}row {row}")


def _parquet_records(part: Part, data: ConfigDict) -> Iterator[tuple[Any, Callable]]:
    pq = _optional("pyarrow.parquet", f"{part.input.path} (parquet)")
    file, fields = part.input.path, FORMATS[data.format][0](data)
    with fs.errors(file), fs.path(file).open("rb") as raw:
        with _arrow_errors(file):
            parquet = pq.ParquetFile(raw)
        _columns(parquet.schema_arrow.names, fields, file, data)
        stop = parquet.metadata.num_row_groups if part.stop < 0 else part.stop
        for group in range(part.start, stop):
            where = f":row-group {group}"
            with _arrow_errors(file, where):
                batches = parquet.iter_batches(row_groups=[group], columns=fields, batch_size=1024)
            rows = 0
            while True:
                with _arrow_errors(file, where):
                    batch = next(batches, None)
                if batch is None:
                    break
                yield from _batch_records(batch, fields, f"{file}{where} ", rows)
                rows += batch.num_rows


def _arrow_batches(reader, is_file: bool) -> Iterator[Any]:
    if is_file:
        yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
        return
    while True:
        try:
            yield reader.read_next_batch()
        except StopIteration:
            return


def _arrow_records(part: Part, data: ConfigDict) -> Iterator[tuple[Any, Callable]]:
    """A `datasets.save_to_disk` file (Arrow IPC stream), or an Arrow IPC file."""
    ipc = _optional("pyarrow.ipc", f"{part.input.path} (arrow)")
    file, fields = part.input.path, FORMATS[data.format][0](data)
    with fs.errors(file), fs.path(file).open("rb") as raw:
        with _arrow_errors(file):
            is_file = raw.read(6) == b"ARROW1"
            raw.seek(0)
            reader = ipc.open_file(raw) if is_file else ipc.open_stream(raw)
        _columns(reader.schema.names, fields, file, data)
        batches, rows = _arrow_batches(reader, is_file), 0
        while True:
            with _arrow_errors(file, f" (after row {rows})"):
                batch = next(batches, None)
            if batch is None:
                return
            yield from _batch_records(batch.select(fields), fields, f"{file}:", rows)
            rows += batch.num_rows


def parse_hub(path: str) -> tuple[str, dict[str, str]]:
    """`hf:NAME?config=C&split=S&revision=R&data_files=GLOB` -> (NAME, options)."""
    name, _, query = path[len(HUB):].partition("?")
    options = dict(urllib.parse.parse_qsl(query))
    unknown = set(options) - {"config", "split", "revision", "data_files"}
    if not name or unknown:
        raise ConfigError(f"config.data.path={path!r}: expected hf:NAME with optional "
                          f"?config=C&split=S&revision=R&data_files=GLOB")
    return name, options


def hub_dataset(path: str):
    """The hub dataset `path` names, streamed (nothing is downloaded whole)."""
    datasets = _optional("datasets", f"config.data.path={path!r} (a HuggingFace hub dataset)")
    name, options = parse_hub(path)
    try:
        return datasets.load_dataset(name, options.get("config"), split=options.get("split",
                                     "train"), revision=options.get("revision"),
                                     data_files=options.get("data_files"), streaming=True)
    except Exception as e:  # noqa: BLE001 (offline, unknown name, no such split: the hub's words)
        raise ConfigError(f"config.data.path={path!r}: cannot stream this dataset from the "
                          f"HuggingFace hub ({type(e).__name__}: {fs.first_line(e)}); check the "
                          f"name and the network, or download it and pass its files") from None


def hub_shards(path: str) -> int:
    return max(1, hub_dataset(path).num_shards)


def _hub_records(part: Part, data: ConfigDict) -> Iterator[tuple[Any, Callable]]:
    dataset = hub_dataset(part.input.path)
    if part.stop >= 0:
        dataset = dataset.shard(num_shards=part.stop, index=part.start)
    for row, record in enumerate(dataset):
        yield record, (lambda row=row: f"{part.input.path} shard {part.start} row {row}")


def _builtin_records(part: Part, data: ConfigDict) -> Iterator[tuple[Any, Callable]]:
    for text in _BUILTINS[part.input.path[len(BUILTIN):]]():
        yield {data.text_field: text}, lambda: part.input.path  # noqa: B023 (never an error)


RECORDS = {"jsonl": lambda part, data: _jsonl_records(part), "parquet": _parquet_records,
           "arrow": _arrow_records, "hub": _hub_records, "builtin": _builtin_records}


def documents(part: Part, data: ConfigDict) -> Iterator[Document]:
    """The non-empty documents of a record file's part."""
    to_document = FORMATS[data.format][1]
    for record, where in RECORDS[part.input.kind](part, data):
        if doc := to_document(record, data, where):
            yield doc


def pieces(part: Part, data: ConfigDict) -> Iterator[Piece]:
    """Everything `part` holds, as pieces of documents."""
    if part.input.kind == "text":
        yield from _text_pieces(part)
        return
    for doc in documents(part, data):
        yield Piece(doc, True, key_bytes(doc), part.split)


# ---------------------------------------------------------------------------------------------
# Parts: how inputs are cut into tasks' reads.

def parquet_row_groups(input: Input) -> list[int]:
    """Uncompressed bytes of each row group (from the footer alone)."""
    pq = _optional("pyarrow.parquet", f"{input.path} (parquet)")
    with fs.errors(input.path), fs.path(input.path).open("rb") as raw, _arrow_errors(input.path):
        metadata = pq.ParquetFile(raw).metadata
        return [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]


def split_input(input: Input, target: int) -> list[tuple[Part, int]]:
    """`input` as parts of about `target` bytes, each with its size: plain text and jsonl files by
    byte ranges, parquet files by row groups, hub datasets by their shards; others whole."""
    if input.kind == "parquet":
        parts, start, size = [], 0, 0
        groups = parquet_row_groups(input) if input.size > target else [input.size]
        for group, group_bytes in enumerate(groups):
            size += group_bytes
            if size >= target or group == len(groups) - 1:
                parts.append((Part(input, start, group + 1 if len(groups) > 1 else -1), size))
                start, size = group + 1, 0
        return parts
    if input.kind == "hub":
        shards = hub_shards(input.path)
        return [(Part(input, i, shards), target) for i in range(shards)]
    if input.compression or input.kind not in ("text", "jsonl") or input.size <= target:
        return [(Part(input), input.size)]
    return [(Part(input, start, min(start + target, input.size)), min(target, input.size - start))
            for start in range(0, input.size, target)]


def split_text_at(input: Input, cut: int, size: int, target: int) -> list[tuple[Part, int]]:
    """A text file of `size` bytes of text as its head [0, cut) for training and its tail for
    validation: a plain file in line-aligned parts of about `target` bytes, a compressed one (read
    from its start whatever the part) in one part each."""
    step = size if input.compression else target
    parts = []
    for split, (begin, end) in (("train", (0, cut)), ("val", (cut, size))):
        for start in range(begin, end, step):
            stop = min(start + step, end)
            parts.append((Part(input, start, stop, begin, end, split), stop - start))
    return parts


def char_boundary(input: Input, offset: int, size: int) -> int:
    """The first UTF-8 character boundary at or after `offset` of `input`'s `size` bytes of text."""
    head = b"".join(_byte_chunks(input, offset, min(offset + 4, size)))
    skip = 0
    while skip < len(head) and head[skip] & 0xC0 == 0x80:
        skip += 1
    return offset + skip
