"""`dsv2 serve` under malformed and generated input: no request, valid or not, gets a 5xx.

Schemathesis reads the server's own OpenAPI schema and sends both POST endpoints its coverage cases
(boundary and type-violating values for every field) and a bounded number of random positive and
negative cases; hand-written nasty bodies must get 400 with OpenAI's error body; values that the
engine step would fail on are refused up front, sparing the requests batched with them.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from .server_util import running_server

MODEL = "dsv2-bundled"


@pytest.fixture(scope="module")
def server():
    # a short context and a small batch keep every valid generated request cheap
    with running_server("--max-model-len", "64", "--max-num-seqs", "8") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def api(server):
    config = schemathesis.Config.from_dict({
        "generation": {"mode": "all"},  # positive and negative
        "phases": {"coverage": {"enabled": True}, "fuzzing": {"enabled": True}},
    })
    return schemathesis.openapi.from_url(server[0] + "/openapi.json", config=config).include(method="POST")


schema = schemathesis.pytest.from_fixture("api")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_no_server_error(case, server):
    if isinstance(case.body, dict):
        # the schema allows any model name; the served one lets valid requests reach the engine
        if isinstance(case.body.get("model"), str):
            case.body["model"] = MODEL
        # no max_tokens means the whole context: a few tokens keep the case cheap; so do at most 2
        # samples (n = 128 with 60 tokens took 10 s on 2 CPU cores). Values past the valid ranges
        # (n over 128, max_tokens past the 64-token context) are left as generated, to be refused.
        if case.body.get("max_tokens") is None:
            case.body["max_tokens"] = 4
        for field, cheap, top in (("max_tokens", 4, 32), ("max_completion_tokens", 4, 32), ("n", 2, 128)):
            value = case.body.get(field)
            if isinstance(value, int) and not isinstance(value, bool) and cheap < value <= top:
                case.body[field] = cheap
    response = case.call(timeout=60)
    assert response.status_code < 500, f"{response.status_code} {response.text}\n{server[1].output[-4000:]}"


def _json(body) -> bytes:
    return json.dumps(body).encode()  # ASCII: a lone surrogate travels as its \u escape


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 4}
NASTY = {  # id: (endpoint, raw body)
    "array-body": ("chat/completions", b"[]"),
    "string-body": ("completions", b'"hi"'),
    "empty-body": ("completions", b""),
    "null-messages": ("chat/completions", _json({**CHAT, "messages": None})),
    "empty-messages": ("chat/completions", _json({**CHAT, "messages": []})),
    "string-messages": ("chat/completions", _json({**CHAT, "messages": "hi"})),
    "unknown-part": ("chat/completions", _json({**CHAT, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]})),
    "unknown-role": ("chat/completions", _json({**CHAT, "messages": [{"role": "tool", "content": "hi"}]})),
    "surrogate-content": ("chat/completions", _json({**CHAT, "messages": [
        {"role": "user", "content": "a\ud800"}]})),
    "surrogate-prompt": ("completions", _json({**COMPLETION, "prompt": ["ok", "a\udfff"]})),
    "seed-1e308": ("completions", _json({**COMPLETION, "seed": 1e308})),
    "seed-10**30": ("completions", _json({**COMPLETION, "seed": 10**30})),
    "max_tokens-10**30": ("completions", _json({**COMPLETION, "max_tokens": 10**30})),
    "max_tokens-1e308": ("chat/completions", _json({**CHAT, "max_tokens": 1e308})),
    "n-10**30": ("completions", _json({**COMPLETION, "n": 10**30})),
    "stop_token_ids-string": ("completions", _json({**COMPLETION, "stop_token_ids": "13"})),
    "mixed-prompts": ("completions", _json({**COMPLETION, "prompt": [[1, 2], "hi"]})),
    "token-beyond-vocab": ("completions", _json({**COMPLETION, "prompt": [1, 10**6]})),
    "nan": ("chat/completions", _json(CHAT)[:-1] + b', "temperature": NaN}'),
    "infinity": ("completions", _json(COMPLETION)[:-1] + b', "presence_penalty": -Infinity}'),
    "int-of-5000-digits": ("completions", _json(COMPLETION)[:-1] + b', "seed": ' + b"9" * 5000 + b"}"),
    "deeply-nested": ("chat/completions", b'{"model": "dsv2-bundled", "messages": ' + b"[" * 100_000
                      + b"]" * 100_000 + b"}"),
    "not-utf8": ("chat/completions",
                 b'{"model": "dsv2-bundled", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
}


@pytest.mark.parametrize("endpoint, body", NASTY.values(), ids=NASTY.keys())
def test_nasty_body(server, endpoint, body):
    r = httpx.post(f"{server[0]}/v1/{endpoint}", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


# each of these overflowed inside the engine step, which then failed every request in its batch
ENGINE_BREAKERS = [({"temperature": 1e-300}, "temperature"),
                   ({"repetition_penalty": 1e-300}, "repetition_penalty"),
                   ({"top_k": 10**30}, "top_k")]


def test_refused_values_spare_the_batch(server):
    url = server[0]
    innocent = {**COMPLETION, "prompt": "Once upon a time", "max_tokens": 40, "ignore_eos": True,
                "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=innocent, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # running in the engine now
        for fields, param in ENGINE_BREAKERS:
            bad = httpx.post(url + "/v1/completions", json={**COMPLETION, "temperature": 1.0, **fields})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        rest = [line[6:] for line in lines if line.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length", rest[-2]
