"""Chat-format data: templates render conversations as transformers does, the loss covers exactly the
assistant's turns and their end token, conversations pack as one segment each, from the
end-of-document id before them; bad input."""

import json

import numpy as np
import pytest

from lm import chat, corpus, data, prepare
from lm import tokenizer as tokenizers
from lm.config import ConfigError, default_config

transformers = pytest.importorskip("transformers")
from hf_models import train_bpe  # noqa: E402

EOS = 256  # the byte tokenizer's end-of-text id
# A system prompt, two exchanges: everything a template must place.
CONVERSATION = chat.Chat((("system", "S"), ("user", "hi"), ("assistant", "yo"), ("user", "ok?"),
                          ("assistant", "no")))
# Qwen2's ChatML template in short: a default system turn when there is none.
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}"
    "\n{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def data_config(path="", **overrides):
    config = default_config().data
    config.update({"path": str(path), "tokenizer": "byte", "format": "chat", **overrides})
    return config


def expected(pieces):
    """Hand-made (ids, weights) from (text or the end-of-text id, scored) pieces, bytes as ids."""
    ids, weights = [], []
    for piece, scored in pieces:
        new = [EOS] if piece == EOS else list(piece.encode())
        ids += new
        weights += [scored] * len(new)
    return np.array(ids), np.array(weights)


def test_the_default_template_scores_exactly_the_assistant_turns_and_their_end():
    template = chat.ChatTemplate.for_run(data_config(), tokenizers.ByteTokenizer())
    ids, weights = template.encode(CONVERSATION)
    want_ids, want_weights = expected([
        ("<|im_start|>system\nS", 0), (EOS, 0), ("\n<|im_start|>user\nhi", 0), (EOS, 0),
        ("\n<|im_start|>assistant\n", 0), ("yo", 1), (EOS, 1),
        ("\n<|im_start|>user\nok?", 0), (EOS, 0), ("\n<|im_start|>assistant\n", 0),
        ("no", 1), (EOS, 1), ("\n", 0)])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(weights, want_weights)
    assert template.end_of_turn == EOS
    prompt = template.prompt_ids("hi")  # after the end-of-document id, as conversations start
    np.testing.assert_array_equal(prompt, expected([(EOS, 0), ("<|im_start|>user\nhi", 0), (
        EOS, 0), ("\n<|im_start|>assistant\n", 0)])[0])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A byte-level BPE whose tokenizer_config.json carries a chat template, as Qwen2's does (and
    whose end of text is its end of turn, <|im_end|>)."""
    folder = tmp_path_factory.mktemp("qwen_tokenizer")
    words = ["alpha bravo charlie delta you are helpful system user assistant"] * 50
    bpe = train_bpe(words, 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    bpe.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE}))
    return folder


def test_a_huggingface_tokenizers_own_template_gives_transformers_ids(hf_folder):
    ours = tokenizers.HuggingFaceTokenizer.from_pretrained(hf_folder, hf_template=True)
    theirs = transformers.AutoTokenizer.from_pretrained(hf_folder)
    template = chat.ChatTemplate.for_run(data_config(), ours)
    assert template.source == QWEN_TEMPLATE
    messages = CONVERSATION.as_dicts()[1:]  # no system turn: the template adds its own
    ids, weights = template.encode(chat.Chat(CONVERSATION.messages[1:]))
    np.testing.assert_array_equal(ids, theirs.apply_chat_template(messages, tokenize=True,
                                                                  return_dict=False))
    end = ours.token_to_id("<|im_end|>")
    assert template.end_of_turn == end == ours.eos_id
    # The scored runs are each reply and its <|im_end|>, not the newline after it.
    scored = np.flatnonzero(weights)
    runs = np.split(ids[scored], np.flatnonzero(np.diff(scored) > 1) + 1)
    assert [ours.decode(r) for r in runs] == ["yo<|im_end|>", "no<|im_end|>"]
    prompt = template.prompt_ids("alpha")
    assert prompt[0] == ours.eos_id  # the document start, then transformers' ids
    np.testing.assert_array_equal(
        prompt[1:], theirs.apply_chat_template([{"role": "user", "content": "alpha"}],
                                               tokenize=True, add_generation_prompt=True,
                                               return_dict=False))
    # Saved with the run's tokenizer, the template comes back with it.
    assert tokenizers.from_json(ours.to_json()).chat_template == QWEN_TEMPLATE


def test_chat_shards_pack_each_conversation_as_one_segment_and_mask_the_rest(hf_folder, tmp_path):
    rng = np.random.default_rng(0)
    conversations = [[{"role": r, "content": " ".join(rng.choice(["alpha", "bravo", "delta"], 2))}
                      for r in ("user", "assistant") * 2] for _ in range(12)]
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps({"conversation": c})
                                                    for c in conversations))
    config = data_config(tmp_path / "chats.jsonl", tokenizer=str(hf_folder / "tokenizer.json"),
                         messages_field="conversation", val_fraction=0.0)
    prepare.prepare(config, 0, tmp_path / "prepared")
    prepared = prepare.load(tmp_path / "prepared")
    tok = prepared.tokenizer
    template = chat.ChatTemplate.for_run(config, tok)
    encoded = [template.encode(d) for d in corpus.read_documents(config)]
    # Every conversation comes after an end-of-document id, as every document does.
    stream = np.concatenate([[tok.eos_id]] + [x for ids, _ in encoded for x in (ids, [tok.eos_id])])
    np.testing.assert_array_equal(np.concatenate(prepared.train.shards), stream)
    [batch] = data.eval_batches(prepared.train, len(stream) - 1, 1, 1, segment_eos=tok.eos_id)
    np.testing.assert_array_equal(
        batch["mask"][0], np.concatenate([x for _, w in encoded for x in (w, [0])]))
    # One segment per conversation, from the end-of-document id before it (position 0), though
    # each holds five <|im_end|> (the tokenizer's end of text; the template adds a system turn):
    # the shards mark the ids that start conversations.
    lengths = [1 + len(ids) for ids, _ in encoded]
    assert (stream == tok.eos_id).sum() == 6 * 12 + 1
    np.testing.assert_array_equal(batch["segment_ids"][0], np.repeat(np.arange(1, 13), lengths))
    np.testing.assert_array_equal(batch["positions"][0],
                                  np.concatenate([np.arange(n) for n in lengths]))
    # The same conversations from a parquet file (a list of structs per row) make the same shards.
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pyarrow.table({"conversation": conversations}), tmp_path / "chats.parquet")
    config.path = str(tmp_path / "chats.parquet")
    prepare.prepare(config, 0, tmp_path / "from_parquet")
    np.testing.assert_array_equal(
        np.concatenate(prepare.load(tmp_path / "from_parquet").train.shards), stream)
    # The template is part of what the prepared shards are: another one prepares them again.
    assert not prepare.prepare(config, 0, tmp_path / "from_parquet")
    config.chat_template = QWEN_TEMPLATE.replace("helpful", "brief")
    assert prepare.prepare(config, 0, tmp_path / "from_parquet")


@pytest.mark.parametrize("line, message", [
    ('{"messages": "hi"}', r"chats.jsonl:1: no list of messages in field 'messages'"),
    ('{"messages": [{"role": "user"}]}', r"chats.jsonl:1: message 0 is not"),
    ('{"text": "hi"}', r"no list of messages.*config.data.messages_field"),
])
def test_bad_conversations_are_one_line_errors(tmp_path, line, message):
    (tmp_path / "chats.jsonl").write_text(line + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        corpus.read_documents(data_config(tmp_path / "chats.jsonl"))
    assert "\n" not in str(error.value)


def test_a_template_that_cannot_render_a_conversation_is_a_one_line_error():
    strict = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ConfigError, match="cannot render.*roles must alternate"):
        chat.ChatTemplate(strict, tokenizers.ByteTokenizer())
    with pytest.raises(ConfigError, match="does not parse"):
        chat.ChatTemplate("{% for %}", tokenizers.ByteTokenizer())
    with pytest.raises(ConfigError, match="chat_template='/no/such.jinja' does not exist"):
        chat.template_source(data_config(chat_template="/no/such.jinja"))
