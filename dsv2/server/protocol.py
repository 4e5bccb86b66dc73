"""The OpenAI request bodies as pydantic models, and their translation to SamplingParams.

Types are strict (a string where a number belongs is a 400, not a coercion), unknown fields are
ignored as OpenAI's clients expect, and fields the engine cannot honour (echo, suffix, logit_bias,
best_of above n) are refused with a message instead of being dropped silently. vLLM's extra
sampling fields (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, min_tokens, ...) are
accepted under their vLLM names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..engine.params import MAX_LOGPROBS, SamplingParams


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _encodable(text: str) -> str:
    text.encode()  # a lone surrogate (JSON's "\ud800") cannot be tokenized: a ValueError, so a 400
    return text


# text that goes to the tokenizer
_Text = Annotated[str, AfterValidator(_encodable)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    model: str
    n: Annotated[int, Field(ge=1, le=128)] = 1
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    min_tokens: Annotated[int, Field(ge=0)] = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """Raises ApiError for what the engine refuses (its messages name the field)."""
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported", param="logit_bias")
        kw = {name: getattr(self, name) for name in (
            "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty")
            if getattr(self, name) is not None}
        try:
            return SamplingParams(n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                                  ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
                                  logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
                                  include_stop_str_in_output=self.include_stop_str_in_output, **kw)
        except ValueError as e:  # SamplingParams' messages begin with the field's name
            field = str(e).split(" ", 1)[0]
            raise ApiError(400, str(e), param=field if field in type(self).model_fields else None) from None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingRequest):
    # a string, a list of strings, token ids, or a list of token-id lists (one choice set each)
    prompt: _Text | list[_Text] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Request):
    type: Literal["text"]
    text: _Text


class Message(_Request):
    role: Literal["system", "user", "assistant"]
    content: _Text | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt, or messages through the chat template."""

    model: str | None = None
    prompt: _Text | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool = True  # a prompt's BOS
    add_generation_prompt: bool = True  # messages: end with the assistant's turn opening


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse(model: type[_Request], body: bytes) -> _Request:
    """The request body as `model`, parsed and validated in one pass of pydantic's JSON parser
    (which refuses NaN, Infinity and nesting past its depth limit); ApiError 400 naming the field
    otherwise. Called off the event loop: a body may be megabytes."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e.errors()) from None


def _validation_error(errors: list[dict]) -> ApiError:
    """The 400 for pydantic's errors, naming the first field."""
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return ApiError(400, f"The body is not valid JSON: {detail}")

    def where(err) -> str:
        return ".".join(str(x) for x in err.get("loc", ()))

    message = "; ".join(f"{where(err) or 'body'}: {err.get('msg')}" for err in errors[:5])
    return ApiError(400, message or "invalid request", param=(where(errors[0]) if errors else None) or None)
