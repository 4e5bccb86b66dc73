r"""Tokenizer: DeepSeek-V2's byte-level BPE (tokenizer.json via `tokenizers`), its chat template,
BPE training for our own small models, and incremental detokenization for streaming.

`DEEPSEEK_V2_CHAT_TEMPLATE` (templates/deepseek_v2_chat.jinja) is byte for byte the `chat_template`
of the released DeepSeek-V2 / V2-Lite (-Chat) checkpoints' tokenizer_config.json, as its JSON string
decodes (no trailing newline). With the system message optional it renders (\n a newline)
    <｜begin▁of▁sentence｜>{system}\n\nUser: {user_1}\n\nAssistant: {assistant_1}<｜end▁of▁sentence｜>
    User: {user_2}\n\nAssistant:
the final "Assistant:" only with add_generation_prompt.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from importlib.resources import files
from pathlib import Path

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
DEEPSEEK_V2_CHAT_TEMPLATE = (files(__package__) / "templates" / "deepseek_v2_chat.jinja").read_text(
    encoding="utf-8"
)
# The released tokenizer_config.json's value; the model itself reaches 128K through YaRN.
MODEL_MAX_LENGTH = 16384
ROLES = ("system", "user", "assistant")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template from tokenizer_config.json."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None = None,
        eos_token: str | None = None,
        chat_template: str | None = None,
        model_max_length: int = MODEL_MAX_LENGTH,
    ):
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.model_max_length = model_max_length

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises a bare Exception carrying serde's message
            raise ValueError(
                f"cannot load {tokenizer_file} (invalid JSON or not a tokenizers file): {e}"
            ) from e

        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            chat_template=config.get("chat_template"),
            model_max_length=config.get("model_max_length", MODEL_MAX_LENGTH),
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json the way the released checkpoints do."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        config = {
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            # transformers' default cleanup would rewrite " ." and " 's", breaking decode parity.
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            # the generic class: it takes tokenizer.json as it is. LlamaTokenizerFast, which the
            # released files name, makes some transformers 5.x versions rebuild a Llama-style
            # tokenizer with an extra <unk>.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
        }
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        # Special tokens are added here, not by tokenizer.json's post-processor, so the result does
        # not depend on how a given file's post-processor is configured.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos_token")
            ids.insert(0, self.bos_token_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """`encode` of each text, with the GIL released while the Rust tokenizer works (plain
        `encode` holds it): a server tokenizing in a worker thread leaves its event loop running."""
        batch = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_bos:
            if self.bos_token_id is None:
                raise ValueError("add_bos=True but the tokenizer has no bos_token")
            for ids in batch:
                ids.insert(0, self.bos_token_id)
        return batch

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes that one token decodes to (a byte-level piece of a character counts
        as its replacement character's 3)."""
        pieces = self.backend.decode_batch([[i] for i in range(self.vocab_size)], skip_special_tokens=False)
        return max(len(p.encode()) for p in pieces)

    def min_tokens(self, text: str) -> int:
        """A lower bound on len(encode(text)) found without tokenizing: each token stands for at most
        max_token_bytes of the text, once a normalizer (if any) has shrunk it, by at most 4x (NFKC's
        most: a 3-byte fullwidth letter to 1 byte). A server refuses a prompt that cannot fit the
        context by this before paying for its tokenization."""
        per_token = self.max_token_bytes * (1 if self.backend.normalizer is None else 4)
        return -(-len(text.encode()) // per_token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, tokenize: bool = True
    ) -> list[int] | str:
        """Render `messages` with the chat template; ids are encoded without adding special tokens
        (the template writes BOS itself), as transformers' apply_chat_template does."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json had none)")
        _check_messages(messages)
        text = _compile_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        return self.encode(text) if tokenize else text


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: list[str] | None = None, min_frequency: int = 2
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with the DeepSeek-V2 chat template attached.

    special_tokens[0] is BOS and special_tokens[1] is EOS (default: DeepSeek-V2's), with ids 0, 1, ...
    Starting from all 256 byte symbols makes every UTF-8 string encodable and round-trip exact.
    """
    special_tokens = [BOS_TOKEN, EOS_TOKEN] if special_tokens is None else list(special_tokens)
    if len(special_tokens) < 2:
        raise ValueError("special_tokens must start with the BOS and EOS tokens")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} < 256 byte symbols + {len(special_tokens)} special tokens")

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    bos, eos = special_tokens[:2]
    # Like the released tokenizer.json: plain `tokenizer(text)` in transformers starts with BOS.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return Tokenizer(backend, bos_token=bos, eos_token=eos, chat_template=DEEPSEEK_V2_CHAT_TEMPLATE)


class StreamDecoder:
    """Incremental detokenization: push ids one at a time, get text as soon as it is complete.

    A byte-level token can end inside a multi-byte UTF-8 character, which decodes to U+FFFD until the
    next token completes it, so text is held back while the decoded tail ends in U+FFFD. Each step
    decodes only a short window (vLLM's prefix/read offsets): the tokens of the previous emission,
    kept as left context so decoding the window agrees with decoding the whole sequence, plus the
    tokens not yet emitted.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window: list[int] = []
        self._read = 0  # window[:_read] is already emitted

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character decodes to U+FFFD, as in decode)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        prefix = self.tokenizer.decode(self._window[: self._read], self.skip_special_tokens)
        text = self.tokenizer.decode(self._window, self.skip_special_tokens)
        # Nothing new (e.g. a skipped special token), or a character still waiting for its bytes.
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        del self._window[: self._read]
        self._read = len(self._window)
        return text[len(prefix) :]


@functools.lru_cache(maxsize=8)
def read_chat_template(spec: str) -> str:
    """A chat template given as vLLM's --chat-template takes it: a file's path, or the Jinja text
    itself; checked to compile, so that a bad one fails at startup rather than at the first chat."""
    path = Path(spec)
    looks_inline = "{{" in spec or "{%" in spec
    if not looks_inline:
        try:
            spec = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"chat template {str(path)!r}: not a readable file ({e.strerror or e}) "
                             "and not a template (no '{{' or '{%')") from None
    try:
        _compile_template(spec)
    except jinja2.TemplateSyntaxError as e:
        where = "the given template" if looks_inline else str(path)
        raise ValueError(f"chat template {where}: line {e.lineno}: {e.message}") from None
    return spec


def _compile_template(template: str):
    # Sandboxed and with transformers' whitespace settings, so both render a template identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def _raise_exception(message: str):
    raise ValueError(f"chat template error: {message}")


def _check_messages(messages: Sequence[dict]) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} content must be a str, got {type(m.get('content')).__name__}")


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e


def _token_content(token: str | dict | None) -> str | None:
    # Released files write special tokens either as a string or as an AddedToken dict.
    return token["content"] if isinstance(token, dict) else token
