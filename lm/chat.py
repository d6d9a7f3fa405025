"""Chat conversations as tokens: a Jinja chat template renders them, the loss falls on the assistant.

`config.data.format=chat` reads records (jsonl lines, parquet or arrow rows) whose `messages` field
holds a conversation, `[{"role": "user", "content": ...}, {"role": "assistant", "content": ...},
...]` (lm/sources.py); lm/shards.py writes each as `ChatTemplate.encode` makes it.
The template is `config.data.chat_template` when set, else the HuggingFace tokenizer's own
`chat_template` (its tokenizer_config.json, or chat_template.jinja), else `DEFAULT_TEMPLATE`
(ChatML). Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII,
and `bos_token`/`eos_token`; the rendered text's special tokens are tokenized as special tokens.

An assistant turn is found by rendering the conversation up to it with the generation prompt, then
up to and including it: the text between is the turn (its content and the template's suffix). Its
scored tokens (loss weight 1) are the content and the suffix up to its first special token, the end
of turn (`<|im_end|>`, `<|eot_id|>`, `</s>`...), which sampling stops at; everything else weighs 0.
A tokenizer without the default template's `<|im_end|>` token writes its end-of-text id in its place.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from typing import Any, Sequence

import numpy as np
from ml_collections import ConfigDict

from lm import fs
from lm.config import ConfigError

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
END_OF_TURN = "<|im_end|>"
_EOS = "<|endoftext|>"  # the end-of-text token's text, for tokenizers whose ids have none
_PROBE = "\u2063"  # what the probe turn says: a character no template alters


@dataclasses.dataclass(frozen=True)
class Chat:
    """One conversation: (role, content) per message."""
    messages: tuple[tuple[str, str], ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def texts(self) -> tuple[str, ...]:
        """Each message's role and content, in order."""
        return tuple(t for message in self.messages for t in message)


def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """transformers' `{% generation %}...{% endgeneration %}` marks: rendered as their body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda f: datetime.datetime.now().strftime(f))
    return env


def template_source(data: ConfigDict, tokenizer: Any = None) -> str:
    """The template a run's config and tokenizer give (see the module's docstring)."""
    given = data.get("chat_template", "")
    if given.endswith(".jinja"):
        if not fs.is_file(given):
            raise ConfigError(f"config.data.chat_template={given!r} does not exist; pass a .jinja "
                              f"file, the template itself, or '' for the tokenizer's own")
        return fs.read_text(given)
    return given or getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE


def config_hash(data: ConfigDict) -> str:
    """What config.data.chat_template says, as a hash (a file's content, not its name)."""
    given = data.get("chat_template", "")
    text = template_source(data) if given else ""
    return hashlib.sha256(text.encode()).hexdigest()


class ChatTemplate:
    """A chat template, and with a tokenizer, conversations as token ids and loss weights."""

    def __init__(self, source: str, tokenizer: Any = None):
        self.source, self.tokenizer = source, tokenizer
        try:
            self._template = _environment().from_string(source)
        except Exception as e:  # jinja2's syntax errors
            raise ConfigError(f"the chat template does not parse ({e})") from None
        self._specials: dict[str, int] = {}
        self.end_of_turn = -1
        if tokenizer is not None:
            self._specials = self._stand_ins(tokenizer)
            self.end_of_turn = self._find_end_of_turn()

    @classmethod
    def for_run(cls, data: ConfigDict, tokenizer: Any) -> ChatTemplate:
        return cls(template_source(data, tokenizer), tokenizer)

    def _token_text(self, key: str) -> str:
        """bos_token/eos_token as the template sees them: the token's own text when it has one."""
        tok = self.tokenizer
        ident = getattr(tok, f"{key}_id", -1) if tok is not None else -1
        text = tok.id_to_token(ident) if ident >= 0 and hasattr(tok, "id_to_token") else None
        return text or ("" if key == "bos" else _EOS)

    def _stand_ins(self, tokenizer: Any) -> dict[str, int]:
        """Texts the tokenizer cannot turn into its special ids by itself, with the ids they mean."""
        has = getattr(tokenizer, "token_to_id", lambda _: None)
        stand_ins = {}
        if tokenizer.eos_id >= 0 and has(_EOS) is None:
            stand_ins[_EOS] = tokenizer.eos_id
        if tokenizer.eos_id >= 0 and has(END_OF_TURN) is None and END_OF_TURN in self.source:
            stand_ins[END_OF_TURN] = tokenizer.eos_id
        return stand_ins

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self._token_text("bos"),
                                         eos_token=self._token_text("eos"))
        except Exception as e:  # raise_exception, or a template bug
            raise ConfigError(f"the chat template cannot render this conversation "
                              f"({type(e).__name__}: {e})") from None

    def tokens(self, text: str) -> np.ndarray:
        """Ids of rendered text, its stand-ins for special ids replaced by them."""
        ids, rest = [], text
        while rest:
            found = [(rest.find(s), s) for s in self._specials if s in rest]
            at, special = min(found) if found else (len(rest), None)
            if at:
                ids.append(self.tokenizer.encode(rest[:at]))
            if special is None:
                break
            ids.append(np.array([self._specials[special]], np.int32))
            rest = rest[at + len(special):]
        return np.concatenate(ids).astype(np.int32) if ids else np.zeros(0, np.int32)

    def _special_ids(self) -> set[int]:
        tok = self.tokenizer
        ids = {i for i in (tok.eos_id, tok.bos_id, tok.pad_id) if i >= 0}
        ids |= set(self._specials.values())
        added = getattr(tok, "special_ids", None)
        return ids | (set(added()) if added else set())

    def _turn(self, messages: list[dict], i: int, text: str) -> tuple[int, int]:
        """Where assistant message i's text starts and ends in `text`, the whole conversation's
        rendering."""
        before = self.render(messages[:i], add_generation_prompt=True)
        through = self.render(messages[:i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ConfigError("the chat template renders a conversation's earlier turns "
                              "differently once later turns follow them, so the assistant's "
                              "tokens cannot be told apart; use another config.data.chat_template")
        return len(before), len(through)

    def _find_end_of_turn(self) -> int:
        probe = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}]
        text = self.render(probe)
        start, end = self._turn(probe, 1, text)
        turn = text[start:end]
        self._suffix = turn[turn.index(_PROBE) + len(_PROBE):] if _PROBE in turn else ""
        special = self._special_ids()
        ends = [t for t in self.tokens(self._suffix) if t in special]
        return int(ends[0]) if ends else self.tokenizer.eos_id

    def _weigh_turn(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """An assistant turn's ids and weights: its content and its suffix up to the end of turn."""
        suffix = self._suffix if self._suffix and text.endswith(self._suffix) else ""
        content = self.tokens(text[:len(text) - len(suffix)])
        tail = self.tokens(suffix)
        ends = np.flatnonzero(tail == self.end_of_turn)
        scored = ends[0] + 1 if len(ends) else len(tail)
        weights = np.concatenate([np.ones(len(content) + scored, np.uint8),
                                  np.zeros(len(tail) - scored, np.uint8)])
        return np.concatenate([content, tail]).astype(np.int32), weights

    def encode(self, chat: Chat) -> tuple[np.ndarray, np.ndarray]:
        """(ids, weights): the rendered conversation's ids, and 1 on each scored one."""
        messages = chat.as_dicts()
        text = self.render(messages)
        pieces, weights, at = [], [], 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = self._turn(messages, i, text)
            before = self.tokens(text[at:start])
            turn, turn_weights = self._weigh_turn(text[start:end])
            pieces += [before, turn]
            weights += [np.zeros(len(before), np.uint8), turn_weights]
            at = end
        pieces.append(self.tokens(text[at:]))
        weights.append(np.zeros(len(pieces[-1]), np.uint8))
        return np.concatenate(pieces).astype(np.int32), np.concatenate(weights)

    def for_transformers(self) -> str:
        """The template as transformers must render it for the same ids: where lm writes the
        end-of-text id for a text the tokenizer lacks (`<|im_end|>`), transformers' template
        writes `{{ eos_token }}`, which its tokenizer reads as that id."""
        source = self.source
        if END_OF_TURN in self._specials:
            source = source.replace(END_OF_TURN, "{{ eos_token }}")
        return source

    def prompt_ids(self, text: str) -> np.ndarray:
        """`text` as a user's turn, then the template's opening of the assistant's reply, after
        the end-of-document id that starts every conversation in prepared data (lm/shards.py)."""
        ids = self.tokens(self.render([{"role": "user", "content": text}],
                                      add_generation_prompt=True))
        eos = self.tokenizer.eos_id
        return np.concatenate([[eos] if eos >= 0 else [], ids]).astype(np.int32)
