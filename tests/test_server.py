"""`dsv2 serve` over real HTTP, through the official `openai` client where it can say the call.

Covers: /health, /v1/models and the chat page; completions and chat completions, streamed and not
(streamed text equals the greedy text, usage counts, n and several prompts, token-id prompts, echo,
logprobs), stop strings and stop token ids, seeds; structured outputs (response_format, vLLM's
fields) for many concurrent mixed requests, and logit_bias; OpenAI error bodies for malformed and
refused requests, the API key (401) and admission (429 with Retry-After); a client that leaves mid-request
has its request aborted and its cache pages freed; SIGTERM lets an open stream finish; /metrics.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import openai
import pytest

from dsv2.cli import bundled_model_dir
from dsv2.engine import StructuredOutputsParams
from dsv2.tokenizer import Tokenizer

from .server_util import running_server
from .structured_util import CHOICES, LARK, PALETTE, POINT, REGEX, USER, check_output

MODEL = "dsv2-bundled"
ALIAS = "another-name"  # the guarded server's second --served-model-name
# the guarded server's --chat-template: nothing like the tokenizer's own
TEMPLATE = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
KEY = "sk-test-key"
PROMPT = "Once upon a time"
# ignore_eos so that max_tokens is reached exactly: finish_reason "length", completion_tokens known
EXACT = {"ignore_eos": True}


@pytest.fixture(scope="module")
def url():
    with running_server() as (url, _):
        yield url


@pytest.fixture(scope="module")
def guarded_url():
    """A key, one request in flight at most, a 512-token context, two names and another chat template."""
    with running_server("--api-key", KEY, "--max-pending", "1", "--max-model-len", "512",
                        "--served-model-name", MODEL, ALIAS, "--chat-template", TEMPLATE) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def guarded(guarded_url):
    return openai.OpenAI(base_url=guarded_url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(bundled_model_dir())


def greedy(client, prompt=PROMPT, max_tokens=12, **kw):
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     extra_body=EXACT, **kw)


def prompt_len(tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_bos=True))  # the server prepends BOS to a text prompt


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    """An OpenAI error body: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error


def metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = httpx.get(url + "/metrics").text
    return {key: float(value) for line in text.splitlines() if line and not line.startswith("#")
            for key, value in [line.rsplit(" ", 1)]}


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Poll /metrics until nothing is in flight or running and every cache page is free."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["dsv2_requests_in_flight"] == 0 and m["dsv2_num_requests_running"] == 0
                and m["dsv2_kv_cache_free_blocks"] == m["dsv2_kv_cache_blocks"]):
            return m
        assert time.monotonic() < deadline, f"the server did not go idle: {m}"
        time.sleep(0.1)


def sse_events(lines) -> list:
    """The JSON payloads of an SSE stream, and "[DONE]" as itself."""
    payloads = [line[6:] for line in lines if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


# --- discovery -------------------------------------------------------------------------------------

def test_models_health_and_chat_page(url, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>dsv2 chat</title>" in page.text


def test_tokenize_and_detokenize(url, client, tokenizer):
    """vLLM's /tokenize (a prompt, or messages through the chat template) and /detokenize: the ids the
    endpoints feed the model, and text back."""
    body = httpx.post(url + "/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    ids = tokenizer.encode(PROMPT, add_bos=tokenizer.bos_token_id is not None)
    assert body == {"tokens": ids, "count": len(ids), "max_model_len": client.models.list().data[0].max_model_len}
    plain = httpx.post(url + "/tokenize", json={"prompt": PROMPT, "add_special_tokens": False}).json()["tokens"]
    assert plain == tokenizer.encode(PROMPT)
    chat = [{"role": "user", "content": "Hi"}]
    templated = httpx.post(url + "/tokenize", json={"messages": chat}).json()["tokens"]
    assert templated == tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    # the completion endpoint reads the same ids: its usage counts them
    usage = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1).usage
    assert usage.prompt_tokens == len(ids)
    assert httpx.post(url + "/detokenize", json={"tokens": plain}).json() == {"prompt": PROMPT}
    assert_error(httpx.post(url + "/tokenize", json={"prompt": "a", "messages": chat}), 400, "prompt")
    assert_error(httpx.post(url + "/tokenize", json={"model": "other", "prompt": "a"}), 400)
    assert_error(httpx.post(url + "/detokenize", json={"tokens": [tokenizer.vocab_size]}), 400, "tokens")
    assert_error(httpx.post(url + "/detokenize", json={"tokens": ["1"]}), 400, "tokens.0")


# --- completions -----------------------------------------------------------------------------------

def test_completion_stream_equals_greedy_text(client, tokenizer):
    full = greedy(client)
    choice = full.choices[0]
    assert choice.text and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == prompt_len(tokenizer, PROMPT)
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12

    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_completion_prompts_and_n(client, tokenizer):
    prompts = ["The king said", "def add(a, b):"]
    alone = [greedy(client, p, max_tokens=4).choices[0].text for p in prompts]
    assert alone[0] != alone[1]  # else the index check below could not tell the prompts apart
    both = greedy(client, prompts, max_tokens=4, n=2)
    # prompt i's n choices are indices i*n .. i*n+n-1; greedy samples of one prompt are equal
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [alone[0]] * 2 + [alone[1]] * 2
    assert both.usage.prompt_tokens == sum(prompt_len(tokenizer, p) for p in prompts)
    assert both.usage.completion_tokens == 4 * 4


def test_completion_token_id_prompts(client, tokenizer):
    ids = tokenizer.encode(PROMPT, add_bos=True)
    by_text = greedy(client, max_tokens=6)
    by_ids = greedy(client, ids, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    several = greedy(client, [ids, ids[:3]], max_tokens=6)
    assert len(several.choices) == 2 and several.usage.prompt_tokens == len(ids) + 3


def test_completion_echo(client):
    plain = greedy(client, max_tokens=6).choices[0].text
    assert greedy(client, max_tokens=6, echo=True).choices[0].text == PROMPT + plain


def test_completion_logprobs(client):
    out = greedy(client, max_tokens=5, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(5)]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        # two alternatives (fewer only where two tokens print alike); greedy picks the likeliest
        assert 1 <= len(top) <= 2 and all(v <= 0 for v in top.values())
        assert chosen == pytest.approx(max(top.values()))


# --- chat ------------------------------------------------------------------------------------------

def chat(client, messages, max_tokens=8, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                          temperature=0, extra_body=EXACT, **kw)


HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def test_chat_stream_equals_greedy_text(client, tokenizer):
    full = chat(client, HELLO)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == len(tokenizer.apply_chat_template(HELLO, add_generation_prompt=True))
    assert full.usage.completion_tokens == 8

    chunks = list(chat(client, HELLO, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage


def test_chat_logprobs(client):
    out = chat(client, HELLO, max_tokens=5, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert bytes(t.bytes).decode() == t.token and t.logprob <= 0
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy


def test_chat_multi_turn_and_system(client, tokenizer):
    turns = [{"role": "system", "content": "You are a poet."}, *HELLO,
             {"role": "assistant", "content": "A humble player."}, {"role": "user", "content": "Recite."}]
    for messages in (turns, turns[1:]):
        out = chat(client, messages, max_tokens=4)
        # the prompt the server built holds every turn, as the template renders it
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert out.usage.prompt_tokens == len(expected)
        assert out.choices[0].message.content


# --- stopping and seeds ----------------------------------------------------------------------------

def test_stop_string(client):
    text = greedy(client, max_tokens=16).choices[0].text
    stop = text[6:10]
    out = greedy(client, max_tokens=16, stop=[stop]).choices[0]
    assert out.text == text[:text.index(stop)] and out.finish_reason == "stop"
    assert out.model_extra["stop_reason"] == stop


def test_stop_token_ids(client, tokenizer):
    tokens = greedy(client, max_tokens=12, logprobs=0).choices[0].logprobs.tokens
    # a token first generated after a few others, and its id (one token however it is encoded)
    at = next(i for i, t in enumerate(tokens)
              if i >= 2 and tokens.index(t) == i and len(tokenizer.encode(t)) == 1)
    stop_id = tokenizer.encode(tokens[at])[0]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={**EXACT, "stop_token_ids": [stop_id]})
    # the stop token is generated (counted) but not shown
    assert out.choices[0].text == "".join(tokens[:at]) and out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra["stop_reason"] == stop_id and out.usage.completion_tokens == at + 1


def test_seeds(client):
    def sample(seed):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body=EXACT).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)  # 16 tokens drawn at temperature 1: equal only by a fluke


# --- structured outputs and logit_bias --------------------------------------------------------------

FEW_SHOT = 'd = {"name": "Hamlet", "age": 30}\nd = {"name": "Romeo", "age": 17}\nd = '


def test_structured_outputs_many_concurrent_requests(url):
    """Every kind of structured output at once, beside free requests, through the openai client:
    each constrained output follows its spec, each free one has its length; every page is free after."""
    aclient = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def fmt(schema):
        return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}

    async def chat(messages, spec, stream=False, **kw):
        kw = {"model": MODEL, "messages": messages, "max_tokens": 230, "temperature": 0, **kw}
        if not stream:
            out = await aclient.chat.completions.create(**kw)
            return spec, out.choices[0].message.content, out.choices[0].finish_reason
        text, finish = "", None
        async for chunk in await aclient.chat.completions.create(stream=True, **kw):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return spec, text, finish

    async def complete(prompt, spec, **kw):
        out = await aclient.completions.create(**{"model": MODEL, "prompt": prompt, "max_tokens": 230,
                                                  "temperature": 0, **kw})
        return spec, out.choices[0].text, out.choices[0].finish_reason, out.usage.completion_tokens

    def spec(**kw):
        return StructuredOutputsParams(**kw)

    ask = [{"role": "user", "content": "Describe one character as JSON."}]
    jobs = []
    for schema in (USER, PALETTE, POINT):
        for extra in ({}, {"temperature": 0.8, "seed": 5}):
            jobs.append(chat(ask, spec(json=schema), response_format=fmt(schema), **extra))
    jobs += [
        chat(ask, spec(json=USER), stream=True, response_format=fmt(USER), temperature=0.8, seed=3),
        complete(FEW_SHOT, spec(json=USER), extra_body={"response_format": fmt(USER)}, temperature=0.8, seed=1),
        complete(FEW_SHOT, spec(json=USER), extra_body={"guided_json": USER}),
        complete(FEW_SHOT, spec(json=POINT), temperature=0.8, seed=2,
                 extra_body={"structured_outputs": {"json": POINT, "disable_any_whitespace": True}}),
        complete("Pick a name:", spec(choice=CHOICES), extra_body={"guided_choice": CHOICES}),
        chat(ask, spec(choice=CHOICES), extra_body={"guided_choice": CHOICES}, temperature=0.8, seed=4),
        complete("Code:", spec(regex=REGEX), extra_body={"guided_regex": REGEX}, temperature=0.8, seed=6),
        complete("Sum:", spec(grammar=LARK), extra_body={"guided_grammar": LARK}),
    ]
    objects = [complete(FEW_SHOT, None, extra_body={"response_format": {"type": "json_object"}}, seed=s,
                        temperature=0.8, max_tokens=96) for s in range(3)]
    objects += [complete(FEW_SHOT, None, extra_body={"structured_outputs": {"json_object": True,
                                                                            "disable_any_whitespace": True}},
                         seed=s, temperature=0.8, max_tokens=96) for s in range(3)]
    free = [complete(PROMPT, None, max_tokens=20, temperature=t, seed=1, extra_body=EXACT) for t in (0, 0.9)] * 2

    async def run():
        return await asyncio.gather(asyncio.gather(*jobs), asyncio.gather(*objects), asyncio.gather(*free))

    constrained, json_objects, free_outputs = asyncio.run(run())
    for spec_, text, finish, *_ in constrained:
        check_output(spec_, text, finish)
    stopped = [text for _, text, finish, _ in json_objects if finish == "stop"]
    assert len(stopped) >= 3  # any object is unbounded: most end, and those that end are objects
    assert all(isinstance(json.loads(text), dict) for text in stopped)
    assert all(finish == "length" and n == 20 for _, _, finish, n in free_outputs)
    wait_idle(url)


def test_structured_outputs_errors(url, client):
    """A spec that does not compile, or two of them, is a 400 naming the field, before any work."""
    def post(**fields):
        return httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields})

    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
         "response_format", "Invalid type: foo"),
        ({"guided_json": {"type": "string", "minLength": 3, "maxLength": 1}}, "guided_json", "Unsatisfiable"),
        ({"guided_json": "{not json"}, "guided_json", "guided_json is not valid JSON"),
        ({"guided_regex": "[0-9"}, "guided_regex", "unclosed character class"),
        ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"structured_outputs": {"regex": "(", "disable_any_whitespace": True}}, "structured_outputs", "regex"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ]
    for fields, param, reason in cases:
        r = post(**fields)
        assert_error(r, 400, param)
        assert reason in r.json()["error"]["message"], r.json()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}})
    assert e.value.param == "response_format" and "properties must be an object" in e.value.message
    # text is no constraint at all
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2,
                                          response_format={"type": "text"}).choices[0].message.content
    wait_idle(url)


def test_logit_bias(client, tokenizer):
    the = tokenizer.encode(" the")[0]
    for temperature in (0, 1.0):
        out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=temperature, seed=0,
                                        logit_bias={str(the): 100}, extra_body=EXACT).choices[0]
        assert out.text == " the" * 5
    tokens = greedy(client, max_tokens=8, logprobs=0).choices[0].logprobs.tokens
    banned = {str(tokenizer.encode(t)[0]): -100 for t in tokens if len(tokenizer.encode(t)) == 1}
    assert banned
    out = greedy(client, max_tokens=8, logprobs=0, logit_bias=banned).choices[0].logprobs.tokens
    assert not {str(tokenizer.encode(t)[0]) for t in out if len(tokenizer.encode(t)) == 1} & set(banned)


# --- errors ----------------------------------------------------------------------------------------

def test_invalid_json(url):
    r = httpx.post(url + "/v1/completions", content=b'{"model": "dsv2-bundled", "prompt": ',
                   headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert "JSON" in r.json()["error"]["message"]


BAD = [  # (endpoint, fields over a valid request, the param the error names); omit: the field left out
    ("completions", {"max_tokens": "5"}, "max_tokens"),
    ("completions", {"temperature": "0.5"}, "temperature"),
    ("completions", {"prompt": openai.omit}, "prompt"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"max_tokens": -1}, "max_tokens"),
    ("completions", {"max_tokens": 5000}, "max_tokens"),  # beyond the 4096-token context
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": 129}, "n"),
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"logit_bias": {"13": 100.5}}, "logit_bias"),
    ("completions", {"logit_bias": {"13x": 5.0}}, "logit_bias"),
    ("completions", {"logit_bias": {"8192": 5.0}}, "logit_bias"),  # the bundled vocabulary is 8,192
    ("completions", {"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),
    ("chat", {"messages": openai.omit}, "messages"),
    ("chat", {"max_tokens": "5"}, "max_tokens"),
    ("chat", {"temperature": "hot"}, "temperature"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logit_bias": {"13": -101}}, "logit_bias"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format"),
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ("chat", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
]


@pytest.mark.parametrize("endpoint, fields, param", BAD,
                         ids=[f"{e}-{k}={'omitted' if v is openai.omit else str(v)[:40]}"
                              for e, f, _ in BAD for k, v in f.items()])
def test_bad_request(client, endpoint, fields, param):
    chat = endpoint == "chat"
    create = client.chat.completions.create if chat else client.completions.create
    prompt = {"messages": HELLO} if chat else {"prompt": PROMPT}
    with pytest.raises(openai.BadRequestError) as e:
        create(**{"model": MODEL, "max_tokens": 4, **prompt, **fields})
    assert e.value.status_code == 400 and e.value.param == param
    assert set(e.value.body) == {"message", "type", "param", "code"}  # OpenAI's error object


def test_unknown_model(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 400 and e.value.code == "model_not_found" and e.value.param == "model"


def test_prompt_beyond_context(guarded):
    with pytest.raises(openai.BadRequestError) as e:
        guarded.completions.create(model=MODEL, prompt=list(range(100, 612)), max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        guarded.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.code == "context_length_exceeded"


def test_api_key(guarded_url, guarded):
    assert httpx.get(guarded_url + "/health").status_code == 200  # open: load balancers probe it
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=guarded_url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    # no key at all (the openai client insists on one)
    assert_error(httpx.get(guarded_url + "/v1/models"), 401, code="invalid_api_key")
    assert_error(httpx.post(guarded_url + "/v1/completions", json={"model": MODEL, "prompt": "x"}), 401)
    assert guarded.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_served_model_names_and_chat_template(guarded_url, guarded, tokenizer):
    """vLLM's --served-model-name with several names and --chat-template in place of the tokenizer's."""
    models = guarded.models.list().data
    assert [m.id for m in models] == [MODEL, ALIAS] and {m.model_extra["max_model_len"] for m in models} == {512}
    out = guarded.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=2)
    assert out.model == ALIAS  # a response names the model asked for
    assert guarded.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2).model == MODEL
    with pytest.raises(openai.BadRequestError, match=ALIAS):
        guarded.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    got = httpx.post(guarded_url + "/tokenize", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": ALIAS, "messages": messages}).json()
    assert got["tokens"] == tokenizer.encode("<<hi>><<yo>>A:")


def test_chat_template_option(tmp_path):
    from dsv2.tokenizer import read_chat_template

    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    assert read_chat_template(str(path)) == read_chat_template(TEMPLATE) == TEMPLATE
    with pytest.raises(ValueError, match="line 1"):
        read_chat_template("{% for m in messages %}unclosed")
    with pytest.raises(ValueError, match="not a readable file"):
        read_chat_template(str(tmp_path / "missing.jinja"))


def test_too_many_pending(guarded_url, guarded):
    wait_idle(guarded_url)
    # long enough to be still generating (so in flight) whatever the transport buffers; closed early
    with httpx.stream("POST", guarded_url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, **EXACT},
                      timeout=30) as held:
        lines = held.iter_lines()  # kept: a dropped line iterator closes the connection
        next(line for line in lines if line.startswith("data: "))  # admitted and producing
        with pytest.raises(openai.RateLimitError) as e:
            guarded.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, stream=True)
        assert e.value.status_code == 429 and e.value.response.headers["retry-after"] == "1"
        assert set(e.value.body) == {"message", "type", "param", "code"}
    wait_idle(guarded_url)  # the held stream, closed, was aborted and its admission released
    assert guarded.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices


# --- clients that leave ----------------------------------------------------------------------------

LONG = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, **EXACT}


def test_stream_disconnect_aborts(url):
    before = wait_idle(url)["dsv2_requests_aborted_total"]
    with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
    after = wait_idle(url)  # in flight 0, running 0, every page free
    assert after["dsv2_requests_aborted_total"] == before + 1


def test_timed_out_request_aborts(url):
    before = wait_idle(url)["dsv2_requests_aborted_total"]
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=LONG, timeout=1.0)
    after = wait_idle(url)
    assert after["dsv2_requests_aborted_total"] == before + 1


# --- shutdown --------------------------------------------------------------------------------------

def test_sigterm_lets_open_stream_finish(tokenizer):
    with running_server() as (url, proc):
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                **LONG, "max_tokens": 300, "stream": True, "stream_options": {"include_usage": True}}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = sse_events([first, *lines])
        assert events[-1] == "[DONE]"
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        n_prompt = prompt_len(tokenizer, PROMPT)
        assert events[-2]["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 300,
                                       "total_tokens": n_prompt + 300}
        # uvicorn drains and shuts the app down; serve turns the SIGTERM it re-raises into a clean
        # exit, so a crash, a hard kill or a hang fails here
        assert proc.wait(timeout=30) == 0, proc.output
        assert "Traceback" not in proc.output, proc.output


# --- metrics ---------------------------------------------------------------------------------------

def test_metrics(url, client):
    before = metrics(url)
    greedy(client, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=3)
    r = httpx.get(url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = metrics(url)

    def grew(key):
        return after[key] - before.get(key, 0)

    assert grew('dsv2_requests_total{endpoint="/v1/completions",status="200"}') == 1
    assert grew('dsv2_requests_total{endpoint="/v1/completions",status="400"}') == 1
    assert grew("dsv2_generation_tokens_total") == 3
    assert grew("dsv2_time_to_first_token_seconds_count") == 1
    assert grew("dsv2_request_latency_seconds_count") == 1
