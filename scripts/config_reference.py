"""The config reference of docs/training.md, generated from lm/config.py's `default_config`.

    python scripts/config_reference.py           # print the table
    python scripts/config_reference.py --write   # replace it in docs/training.md

Every field's default comes from `default_config()` itself and its meaning from the comment on its
line (and the comment-only lines under it), so the source stays the one place a field is described.
tests/test_docs.py fails when the table in the docs and this output disagree, or a field has no
comment.
"""

from __future__ import annotations

import inspect
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm import config as lm_config  # noqa: E402

DOC = ROOT / "docs" / "training.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def field_comments() -> dict[str, str]:
    """{"model.d_model": "residual stream width", ...} from `default_config`'s source."""
    source = inspect.getsource(lm_config.default_config)
    sections = {}  # alias -> section name, from lines such as `c.model = m = ConfigDict()`
    comments: dict[str, str] = {}
    field, line_of_field = None, -1
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        line = token.line.strip()
        if token.type == tokenize.NAME and token.start[0] != line_of_field:
            section = re.match(r"c\.(\w+) = (\w+) = ConfigDict\(\)", line)
            if section:
                sections[section.group(2)] = section.group(1)
            assign = re.match(r"(\w+)\.(\w+) = ", line)
            if assign and not section and token.string == assign.group(1):
                prefix = "" if assign.group(1) == "c" else sections[assign.group(1)] + "."
                field, line_of_field = prefix + assign.group(2), token.start[0]
                comments.setdefault(field, "")
        elif token.type == tokenize.COMMENT and field is not None:
            own_line = line.startswith("#")
            if own_line and token.start[0] != line_of_field and not comments[field]:
                continue  # a block comment above the next field, not a continuation
            comments[field] = f"{comments[field]} {token.string.lstrip('# ').strip()}".strip()
        elif token.type == tokenize.NL and line == "":
            field = None  # a blank line ends a field's comment
    return comments


def flat_defaults() -> dict[str, object]:
    out = {}

    def walk(tree, prefix):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
    walk(lm_config.default_config().to_dict(), "")
    return out


def table() -> str:
    comments, defaults = field_comments(), flat_defaults()
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name in [*comments, *(n for n in defaults if n not in comments)]:  # the source's order
        value = defaults[name]
        meaning = comments.get(name, "").replace("|", "\\|").replace("<", "&lt;")
        rows.append(f"| `{name}` | `{value!r}` | {meaning} |")
    return "\n".join(rows)


def missing_comments() -> list[str]:
    comments = field_comments()
    return [name for name in flat_defaults() if not comments.get(name)]


def replace_in(text: str) -> str:
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table()}\n{END}{after}"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        DOC.write_text(replace_in(DOC.read_text()))
        print(f"wrote the config reference into {DOC.relative_to(ROOT)}")
    else:
        print(table())
