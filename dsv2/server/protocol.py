"""The OpenAI request bodies as pydantic models, and their translation to SamplingParams.

Types are strict (a string where a number belongs is a 400, not a coercion), unknown fields are
ignored as OpenAI's clients expect, and fields the engine cannot honour (suffix, best_of above n,
echo with logprobs) are refused with a message instead of being dropped silently. vLLM's extra
sampling fields (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, min_tokens, ...) are
accepted under their vLLM names.

Structured outputs come as OpenAI's `response_format` (json_object, or json_schema with its
schema), as vLLM's `structured_outputs` object, or as vLLM's older `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar` fields; at most one of them per request. `logit_bias` is
OpenAI's: token ids as decimal strings, each bias in [-100, 100], at most 300 of them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ..engine.params import MAX_LOGPROBS, SamplingParams, StructuredOutputsParams

MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit


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


class JsonSchemaFormat(_Request):
    """response_format.json_schema. `strict` is accepted and changes nothing: the output always
    follows the schema."""

    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` request field: StructuredOutputsParams' fields."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False


# the fields that ask for a structured output, in the order their conflicts are reported
STRUCTURED_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar")


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
    # structured outputs (the module's docstring)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The structured output asked for and the field that asked, or (None, None); ApiError 400
        for a malformed one or for more than one. Whether it compiles is the engine's to say."""
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if not given:
            return None, None
        if len(given) > 1:
            raise ApiError(400, f"give at most one of {', '.join(STRUCTURED_FIELDS)}; got {' and '.join(given)}",
                           param=given[1])
        field = given[0]
        value = getattr(self, field)
        try:
            if field == "response_format":
                if value.type == "json_object":
                    return StructuredOutputsParams(json_object=True), field
                if value.json_schema is None or value.json_schema.schema_ is None:
                    raise ApiError(400, "response_format of type json_schema needs json_schema.schema", param=field)
                return StructuredOutputsParams(json=value.json_schema.schema_), field
            if field == "structured_outputs":
                return StructuredOutputsParams(
                    json=value.json_, regex=value.regex, choice=value.choice, grammar=value.grammar,
                    json_object=value.json_object, disable_any_whitespace=value.disable_any_whitespace), field
            return StructuredOutputsParams(**{field.removeprefix("guided_"): value}), field
        except ValueError as e:  # its messages name structured_outputs' fields: name the request's
            message = str(e)
            if field.startswith("guided_"):
                message = message.replace(f"structured_outputs.{field.removeprefix('guided_')}", field)
            if not message.startswith(field):
                message = f"{field}: {message}"
            raise ApiError(400, message, param=field) from None

    def token_bias(self) -> dict[int, float] | None:
        """logit_bias with its keys read as token ids (the range of ids is the server's to check)."""
        if not self.logit_bias:
            return None
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ApiError(400, f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got "
                                f"{len(self.logit_bias)}", param="logit_bias")
        bad = next((k for k in self.logit_bias if not (k.isascii() and k.isdigit() and len(k) <= 18)), None)
        if bad is not None:
            raise ApiError(400, f"logit_bias keys must be token ids (decimal integers), got {bad[:40]!r}",
                           param="logit_bias")
        return {int(k): v for k, v in self.logit_bias.items()}

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """Raises ApiError for what the engine refuses (its messages name the field)."""
        logit_bias = self.token_bias()
        kw = {name: getattr(self, name) for name in (
            "temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty")
            if getattr(self, name) is not None}
        try:
            return SamplingParams(n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                                  ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
                                  logprobs=logprobs, skip_special_tokens=self.skip_special_tokens,
                                  include_stop_str_in_output=self.include_stop_str_in_output,
                                  logit_bias=logit_bias, structured_outputs=structured_outputs, **kw)
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
