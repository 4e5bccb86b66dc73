import json
import random

import pytest

from dsv2.tokenizer import (
    BOS_TOKEN,
    DEEPSEEK_V2_CHAT_TEMPLATE,
    EOS_TOKEN,
    StreamDecoder,
    Tokenizer,
    train_bpe,
)


def corpus() -> list[str]:
    rng = random.Random(0)
    english = (
        "The quick brown fox jumps over the lazy dog. Mixture-of-experts models route each token "
        "to a few experts, and latent attention caches a compressed vector per token instead of "
        "full keys and values. It's cheaper; isn't it?"
    ).split()
    code = [
        "def forward(self, x):\n    return self.proj(x) + 1\n",
        "for i in range(10):\n    total += weights[i] * 2.5\n",
        "class Cache:\n    def __init__(self, size: int) -> None:\n        self.size = size\n",
    ]
    other = ["café", "naïve", "résumé", "Straße", "你好世界", "深度求索", "模型", "こんにちは"]
    other += ["😀", "🚀", "👍🏽"]
    texts = []
    for _ in range(60):
        texts.append(" ".join(rng.choice(english + other) for _ in range(25)))
        texts.append(rng.choice(code))
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(corpus(), vocab_size=500)


@pytest.fixture(scope="module")
def hf_tok(tok, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return transformers.AutoTokenizer.from_pretrained(path)


UNSEEN = "Zebra crossings 🦓 in Zürich; 北京欢迎你 🇨🇳 — ½ ∑ x² \t\n  trailing  "

CONVERSATIONS = {
    "one_user": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi 你好"}],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is MLA?"},
        {"role": "assistant", "content": "Latent attention 🚀."},
        {"role": "user", "content": "And MoE?"},
        {"role": "assistant", "content": "Experts."},
        {"role": "user", "content": "Thanks"},
    ],
    "no_system_multi_turn": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
}


def test_special_tokens(tok):
    assert (tok.bos_token, tok.eos_token) == (BOS_TOKEN, EOS_TOKEN)
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    assert tok.encode(BOS_TOKEN + "hi" + EOS_TOKEN)[0] == 0
    assert tok.encode(BOS_TOKEN + "hi" + EOS_TOKEN)[-1] == 1
    assert tok.encode("hi", add_bos=True) == [0] + tok.encode("hi")
    assert tok.vocab_size == 500
    assert tok.chat_template == DEEPSEEK_V2_CHAT_TEMPLATE


def test_round_trip_unseen_text(tok):
    for text in [UNSEEN, "🤖🧠 emoji only", "混合 mixed ünïcödé", "", " "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
    ids = tok.encode(UNSEEN, add_bos=True)
    assert tok.decode(ids) == BOS_TOKEN + UNSEEN
    assert tok.decode(ids, skip_special_tokens=True) == UNSEEN


def test_encode_batch_is_encode_of_each(tok):
    texts = corpus()[:20] + [UNSEEN, "", " ", BOS_TOKEN + " literal special token"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=True) == [tok.encode(t, add_bos=True) for t in texts]


def test_min_tokens_is_a_lower_bound(tok):
    """The server's pre-check refuses a prompt whose min_tokens exceeds the context, so it must
    never exceed the real count, whatever the text (multi-byte characters, special tokens, the
    longest tokens back to back)."""
    rng = random.Random(1)
    vocab = [tok.decode([i]) for i in range(tok.vocab_size)]
    longest = max(vocab, key=lambda p: len(p.encode()))
    assert tok.max_token_bytes == len(longest.encode())
    texts = corpus() + [UNSEEN, longest * 50, BOS_TOKEN * 7, "😀" * 300, ""]
    texts += ["".join(rng.choice(vocab) for _ in range(rng.randrange(1, 400))) for _ in range(200)]
    for text in texts:
        assert tok.min_tokens(text) <= len(tok.encode(text)), text[:80]
    assert tok.min_tokens(longest * 50) >= 50  # and tight where every token is a longest one


def test_training_is_deterministic(tok, tmp_path):
    again = train_bpe(iter(corpus()), vocab_size=500)
    tok.save(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode(UNSEEN) == tok.encode(UNSEEN)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.vocab_size) == (0, 1, 500)
    assert loaded.chat_template == DEEPSEEK_V2_CHAT_TEMPLATE


def test_from_dir_accepts_added_token_dicts(tok, tmp_path):
    tok.save(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("bos_token", "eos_token"):
        config[key] = {"__type": "AddedToken", "content": config[key], "lstrip": False, "normalized": True}
    config_file.write_text(json.dumps(config), encoding="utf-8")
    loaded = Tokenizer.from_dir(tmp_path)
    assert (loaded.bos_token, loaded.eos_token) == (BOS_TOKEN, EOS_TOKEN)
    assert (loaded.bos_token_id, loaded.eos_token_id) == (0, 1)


def test_template_is_the_released_one():
    assert DEEPSEEK_V2_CHAT_TEMPLATE.startswith("{% if not add_generation_prompt is defined %}")
    assert "{{ 'Assistant: ' + message['content'] + eos_token }}" in DEEPSEEK_V2_CHAT_TEMPLATE
    assert not DEEPSEEK_V2_CHAT_TEMPLATE.endswith("\n")


def test_template_renders_reference_format(tok):
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"},
    ]
    expected = (
        "<｜begin▁of▁sentence｜>SYS\n\nUser: U1\n\nAssistant: A1<｜end▁of▁sentence｜>"
        "User: U2\n\nAssistant:"
    )
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    assert tok.apply_chat_template(messages, tokenize=False) == expected.removesuffix("Assistant:")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids == tok.encode(expected)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids.count(tok.eos_token_id) == 1


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tok, hf_tok, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    kwargs = dict(add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(messages, tokenize=False, **kwargs) == hf_tok.apply_chat_template(
        messages, tokenize=False, **kwargs
    )
    assert tok.apply_chat_template(messages, **kwargs) == hf_tok.apply_chat_template(
        messages, tokenize=True, return_dict=False, **kwargs
    )


def test_encode_decode_match_transformers(tok, hf_tok):
    assert hf_tok.bos_token_id == tok.bos_token_id and hf_tok.eos_token_id == tok.eos_token_id
    assert len(hf_tok) == tok.vocab_size
    assert hf_tok(UNSEEN).input_ids == tok.encode(UNSEEN, add_bos=True)  # add_bos_token, as released
    assert hf_tok(UNSEEN, add_special_tokens=False).input_ids == tok.encode(UNSEEN)
    ids = tok.encode(UNSEEN + " it 's . ,", add_bos=True)
    for skip in (False, True):
        assert hf_tok.decode(ids, skip_special_tokens=skip) == tok.decode(ids, skip_special_tokens=skip)


def stream(tok, ids, skip_special_tokens=True):
    decoder = StreamDecoder(tok, skip_special_tokens=skip_special_tokens)
    chunks = [decoder.push(i) for i in ids]
    return chunks + [decoder.flush()]


def test_stream_decoder_on_real_text(tok):
    rng = random.Random(1)
    alphabet = list("abc xyz.,\n") + ["é", "ß", "世", "界", "😀", "🚀", "👍🏽", "🦓"]
    # A tiny vocabulary splits multi-byte characters across several byte-level tokens.
    small = train_bpe(corpus(), vocab_size=300)
    for t in (tok, small):
        for _ in range(30):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
            ids = t.encode(text)
            # Special tokens anywhere, even between the bytes of one character: skipped, they leave
            # valid text; kept, they break that character into U+FFFD, as decode does.
            for _ in range(rng.randrange(3)):
                ids.insert(rng.randrange(len(ids) + 1), rng.choice([t.bos_token_id, t.eos_token_id]))
            for skip in (True, False):
                chunks = stream(t, ids, skip)
                full = t.decode(ids, skip_special_tokens=skip)
                assert "".join(chunks) == full
                if "\ufffd" not in full:
                    assert not any("\ufffd" in c for c in chunks)
    assert small.decode(small.encode("😀")[:1]) == "\ufffd"  # the case the decoder must hold back


def test_stream_decoder_decodes_a_short_window(tok):
    lengths = []

    class Spy(Tokenizer):
        def decode(self, ids, skip_special_tokens=False):
            lengths.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    spy = Spy(tok.backend, tok.bos_token, tok.eos_token)
    ids = tok.encode(UNSEEN * 20)
    assert "".join(stream(spy, ids)) == tok.decode(ids)
    assert max(lengths) <= 8 < len(ids)


def test_stream_decoder_on_random_ids(tok):
    rng = random.Random(2)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        for skip in (True, False):
            assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_stream_decoder_holds_back_partial_characters(tok):
    byte_ids = [tok.backend.token_to_id(c) for c in "ðŁĺĢ"]  # the byte-level symbols of 😀's 4 bytes
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in byte_ids] == ["", "", "", "😀"]
    decoder = StreamDecoder(tok)
    assert [decoder.push(i) for i in byte_ids[:2]] == ["", ""]
    assert decoder.flush() == "\ufffd" == tok.decode(byte_ids[:2])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_malformed_json(tok, tmp_path, name):
    tok.save(tmp_path)
    (tmp_path / name).write_text('{"truncated": ', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{name}.*(invalid JSON|not valid JSON)"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "messages, error",
    [
        ([{"role": "tool", "content": "x"}], "message 0 has role 'tool'"),
        ([{"role": "user", "content": "x"}, {"content": "y"}], "message 1 has role None"),
        ([{"role": "user", "content": None}], "message 0 content must be a str"),
        (["hello"], "message 0 must be a dict"),
        ("hello", "messages must be a list"),
    ],
)
def test_bad_messages(tok, messages, error):
    with pytest.raises(ValueError, match=error):
        tok.apply_chat_template(messages)


def test_missing_chat_template(tok):
    bare = Tokenizer(tok.backend, tok.bos_token, tok.eos_token)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_raise_exception(tok):
    strict = Tokenizer(tok.backend, chat_template="{{ raise_exception('only users may speak') }}")
    with pytest.raises(ValueError, match="only users may speak"):
        strict.apply_chat_template([{"role": "user", "content": "hi"}])
