"""The request fields real clients send, on a live job through the official `openai` client:
token-id prompts, stop lists, usage on streams, vLLM's /tokenize and /detokenize, and the model
card's max_model_len. Every other value of those fields is a 400 naming it, and none restarts
the job (a fuzz over the HTTP bodies)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

import openai
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dslaunch.engine import tinymodel
from tests.conftest import Cli
from tests.front.conftest import TOKEN


def _oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=TOKEN, timeout=120, max_retries=0)


def _post(base_url: str, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    req = urllib.request.Request(base_url.removesuffix("/v1") + path, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _prompt_scores(model: Path, ids: list[int]) -> list[float]:
    """The plain model's log-likelihood of each token after the first (raw logits)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model)(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    lp = torch.log_softmax(logits, dim=-1)
    return lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def test_echo_scores_the_prompt_as_the_plain_model_does(base_url: str, tmp_path: Path) -> None:
    """What log-likelihood scoring (lm-eval's local-completions) sends: token ids, `echo`,
    `logprobs`, and 0 or 1 new tokens; the prompt's logprobs equal the plain model's."""
    c = _oai(base_url)
    model = tinymodel.build(tmp_path / tinymodel.NAME)  # the job's built-in model, built the same way
    prompt = "The quick brown fox jumps over"
    _, tok = _post(base_url, "/tokenize", {"prompt": prompt})
    ids = tok["tokens"]
    want = _prompt_scores(model, ids)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    ch = r.choices[0]
    assert ch.text == prompt and ch.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 0)
    lp = ch.logprobs
    assert len(lp.tokens) == len(lp.text_offset) == len(ids) and lp.text_offset[0] == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert [len(alts) for alts in lp.top_logprobs[1:]] == [2] * (len(ids) - 1)
    assert lp.text_offset == sorted(lp.text_offset)
    plain = c.completions.create(model="tiny", prompt=ids, max_tokens=3, logprobs=1, temperature=0)
    both = c.completions.create(model="tiny", prompt=ids, max_tokens=3, logprobs=1, echo=True, temperature=0)
    text = both.choices[0].text
    assert text.endswith(plain.choices[0].text) and prompt in text, text
    scores = both.choices[0].logprobs.token_logprobs
    assert len(scores) == len(ids) + 3 and scores[0] is None
    assert scores[1:] == pytest.approx(want + plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    streamed = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True, stream=True, temperature=0)
    alone = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0).choices[0].text
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == prompt + alone
    for asked in (prompt, ids):  # a stream with echo and logprobs: the same text, tokens, scores and offsets
        for new in (3, 0):
            args = {"model": "tiny", "prompt": asked, "max_tokens": new, "logprobs": 1, "echo": True, "temperature": 0}
            whole = c.completions.create(**args).choices[0]
            chunks = [ch.choices[0] for ch in c.completions.create(**args, stream=True) if ch.choices]
            assert "".join(ch.text for ch in chunks) == whole.text and chunks[0].text.startswith(prompt)
            lps = [ch.logprobs for ch in chunks if ch.logprobs]
            assert [t for lp in lps for t in lp.tokens] == whole.logprobs.tokens, (asked, new)
            assert [o for lp in lps for o in lp.text_offset] == whole.logprobs.text_offset
            got = [x for lp in lps for x in lp.token_logprobs]
            assert got[0] is None and got[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-4)


class Pick(pydantic.BaseModel):
    colour: Literal["red", "green", "blue"]
    ok: bool
    count: int = pydantic.Field(ge=0, le=9)


def test_structured_output_through_the_client_parses_into_the_pydantic_model(base_url: str) -> None:
    pytest.importorskip("xgrammar")
    c = _oai(base_url)
    messages = [{"role": "user", "content": "Pick a colour"}]
    for extra in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
        r = c.beta.chat.completions.parse(model="tiny", messages=messages, response_format=Pick, max_tokens=80, **extra)
        assert isinstance(r.choices[0].message.parsed, Pick), r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop"
    schema = {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}
    fmt = {"type": "json_schema", "json_schema": {"name": "pair", "schema": schema}}
    done = c.completions.create(model="tiny", prompt="Two booleans:", max_tokens=40, temperature=0,
                                extra_body={"response_format": fmt})  # fmt: skip
    pair = json.loads(done.choices[0].text)
    assert len(pair) == 2 and all(isinstance(b, bool) for b in pair)
    chat = {"model": "tiny", "messages": messages, "max_tokens": 80, "temperature": 0, "response_format": fmt}
    stream = c.chat.completions.create(**chat, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert json.loads(streamed) == json.loads(c.chat.completions.create(**chat).choices[0].message.content)
    bad = {"name": "bad", "schema": {"type": "integer", "minimum": 3, "maximum": 1}}
    body = {"messages": messages, "response_format": {"type": "json_schema", "json_schema": bad}}
    status, answer = _post(base_url, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "response_format", answer


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The forecast",
        "parameters": {
            "type": "object",
            "additionalProperties": False,
            "required": ["city", "days"],
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                         "additionalProperties": False}}}  # fmt: skip


def test_tools_named_required_streamed_and_in_the_history_through_the_client(base_url: str) -> None:
    pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    c = _oai(base_url)
    ask = [{"role": "user", "content": "Weather in Rome?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, CLOCK], tool_choice=named,
                                  max_tokens=80, temperature=0)  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    req = c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, CLOCK], tool_choice="required",
                                    max_tokens=120, temperature=1.0, seed=5, parallel_tool_calls=False)  # fmt: skip
    assert req.choices[0].finish_reason == "tool_calls"
    assert len(req.choices[0].message.tool_calls) == 1, "parallel_tool_calls false: one call"
    assert req.choices[0].message.tool_calls[0].function.name in {"get_weather", "now"}
    chunks = list(c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, CLOCK], tool_choice=named,
                                            max_tokens=80, temperature=0, stream=True))  # fmt: skip
    deltas = [d for ch in chunks if ch.choices for d in ch.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "get_weather", call.function.arguments)], "the same call, streamed as one delta"  # fmt: skip
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # auto: the random model writes text, which is content; the template rendered the tools
    auto = c.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER], max_tokens=8, temperature=0)
    plain = c.chat.completions.create(model="tiny", messages=ask, max_tokens=8, temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length") and auto.choices[0].message.content is not None
    assert auto.usage.prompt_tokens > plain.usage.prompt_tokens, "the chat template rendered the tools"
    history = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]  # fmt: skip
    after = c.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=8, temperature=0)
    assert after.usage.prompt_tokens > auto.usage.prompt_tokens and after.choices[0].message.content is not None
    status, answer = _post(base_url, "/v1/chat/completions", {"messages": ask, "tools": [WEATHER],
                           "tool_choice": {"type": "function", "function": {"name": "other"}}})  # fmt: skip
    assert status == 400 and answer["error"]["param"] == "tool_choice", answer


def test_query_asks_for_a_schema_and_logprobs_and_names_a_bad_one(job: tuple[Cli, dict[str, Any]]) -> None:
    pytest.importorskip("xgrammar")
    cli = job[0]
    schema = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}'
    out = cli("query", "--schema", schema, "-k", "40", "Well?")
    assert out.returncode == 0 and isinstance(json.loads(out.stdout)["ok"], bool), out.stdout + out.stderr
    lp = cli("query", "--logprobs", "2", "--json", "-k", "3", "Hello")
    doc = json.loads(lp.stdout)["logprobs"]
    assert len(doc["token_logprobs"]) == 3 and all(len(alts) == 2 for alts in doc["top_logprobs"])
    for args, words in ((["--schema", '{"type": "objec"}'], "schema refused"), (["--schema", "[1"], "not valid JSON"),
                        (["--schema", "@/nonexistent"], "No such file")):  # fmt: skip
        bad = cli("query", *args, "x")
        assert bad.returncode == 1 and words in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_tokenize_detokenize_and_token_id_prompts(base_url: str) -> None:
    c = _oai(base_url)
    status, tok = _post(base_url, "/tokenize", {"model": "tiny", "prompt": "Hello world"})
    assert status == 200 and set(tok) == {"count", "max_model_len", "tokens", "token_strs"}, tok
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["token_strs"] is None
    card = c.models.retrieve("tiny")
    assert card.max_model_len == tok["max_model_len"] > 0  # type: ignore[attr-defined]
    text = c.completions.create(model="tiny", prompt="Hello world", max_tokens=6, temperature=0)
    assert text.usage.prompt_tokens == tok["count"], "the ids /tokenize gives are those the engine runs"
    ids = c.completions.create(model="tiny", prompt=tok["tokens"], max_tokens=6, temperature=0)
    assert ids.choices[0].text == text.choices[0].text and ids.usage.prompt_tokens == tok["count"]
    _, other = _post(base_url, "/tokenize", {"prompt": "The quick brown fox", "return_token_strs": True})
    assert len(other["token_strs"]) == other["count"]
    two = c.completions.create(model="tiny", prompt=[tok["tokens"], other["tokens"]], max_tokens=6, temperature=0)
    alone = c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0)
    assert [ch.text for ch in two.choices] == [text.choices[0].text, alone.choices[0].text]
    assert two.usage.prompt_tokens == tok["count"] + other["count"]
    status, back = _post(base_url, "/detokenize", {"model": "tiny", "tokens": tok["tokens"]})
    assert status == 200 and "Hello world" in back["prompt"], back

    messages = [{"role": "user", "content": "Hello"}]
    _, chat_tok = _post(base_url, "/tokenize", {"messages": messages})
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
    assert chat.usage.prompt_tokens == chat_tok["count"]


def test_stop_lists_and_usage_on_chat_streams(base_url: str) -> None:
    c = _oai(base_url)
    full = c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0).choices[0].text
    stops = [full[6:8], full[3:5]]
    stopped = c.completions.create(model="tiny", prompt="Hello world", max_tokens=12, temperature=0, stop=stops)
    assert stopped.choices[0].text == full[: min(full.index(s) for s in stops)]
    assert stopped.choices[0].finish_reason == "stop"
    messages = [{"role": "user", "content": "Hello"}]
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    assert all(ch.usage is None for ch in chunks[:-1]) and chunks[-1].choices == []
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0)
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_penalties_through_the_client_streamed_and_not(job: tuple[Cli, Any], base_url: str, port: int) -> None:
    """The same greedy text as the NDJSON protocol with the same fields (which
    tests/test_penalties.py checks against transformers), on completions and chat."""
    from dslaunch.client import Client

    c = _oai(base_url)
    fields = {"presence_penalty": 1.5, "frequency_penalty": 0.9, "logit_bias": {"7": 3}}
    extra = {"repetition_penalty": 1.4, "min_tokens": 4, "ignore_eos": True}  # vLLM's, beside OpenAI's
    with Client("127.0.0.1", port, token=TOKEN, timeout=120) as nd:
        want = nd.generate("Hello world", max_new_tokens=10, **fields, **extra)
        plain = nd.generate("Hello world", max_new_tokens=10)
    assert want["text"] != plain["text"] and want["tokens"] == 10
    r = c.completions.create(model="tiny", prompt="Hello world", max_tokens=10, temperature=0, **fields,
                             extra_body=extra)  # fmt: skip
    assert r.choices[0].text == want["text"] and r.usage.completion_tokens == 10
    chunks = list(c.completions.create(model="tiny", prompt="Hello world", max_tokens=10, temperature=0, stream=True,
                                       **fields, extra_body=extra))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want["text"]
    messages = [{"role": "user", "content": "Hello"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, **fields,
                                     extra_body=extra)  # fmt: skip
    streamed = c.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
                                         **fields, extra_body=extra)  # fmt: skip
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == chat.choices[0].message.content
    q = job[0]("query", "Hello world", "-k", "10", "--presence-penalty", "1.5", "--frequency-penalty", "0.9",
               "--logit-bias", "7=3", "--repetition-penalty", "1.4", "--min-tokens", "4", "--ignore-eos",
               "--json")  # fmt: skip
    assert q.returncode == 0 and json.loads(q.stdout)["text"] == want["text"], q.stdout + q.stderr
    bad = job[0]("query", "Hello", "--logit-bias", "seven=3")
    assert bad.returncode != 0 and "--logit-bias 'seven=3'" in bad.stderr and "Traceback" not in bad.stderr


def test_logprobs_in_the_openai_shapes(base_url: str, port: int) -> None:
    """The NDJSON numbers (which tests/test_logprobs.py checks against transformers) in the
    completions and chat shapes, as the official client reads them."""
    from dslaunch.client import Client

    c = _oai(base_url)
    with Client("127.0.0.1", port, token=TOKEN, timeout=120) as nd:
        want = nd.generate("Hello world", max_new_tokens=8, logprobs=3)["logprobs"]
    r = c.completions.create(model="tiny", prompt="Hello world", max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens == want["tokens"] and len(lp.tokens) == r.usage.completion_tokens
    assert lp.token_logprobs == want["token_logprobs"]
    assert [list(d) for d in lp.top_logprobs] == [[a["token"] for a in alts] for alts in want["top_logprobs"]] or all(
        len(d) <= 3 for d in lp.top_logprobs)  # two alternatives may share a text: one key  # fmt: skip
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert r.choices[0].text.startswith(lp.tokens[0])
    messages = [{"role": "user", "content": "Hello"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                     top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert bytes(content[0].bytes).decode() == content[0].token
    plain = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5, temperature=0, logprobs=False)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == chat.choices[0].message.content


def test_n_samples_have_their_own_seed_streams_and_usage(base_url: str, port: int) -> None:
    from dslaunch.client import Client

    c = _oai(base_url)
    r = c.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=1.0, seed=40, n=3)
    with Client("127.0.0.1", port, token=TOKEN, timeout=120) as nd:
        want = [nd.generate("Hello", max_new_tokens=6, temperature=1.0, seed=40 + j) for j in range(3)]
    assert [ch.text for ch in r.choices] == [w["text"] for w in want] and [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.text for ch in r.choices}) > 1, "each sample draws its own tokens"
    assert r.usage.prompt_tokens == want[0]["prompt_tokens"], "the prompt is counted once"
    assert r.usage.completion_tokens == sum(w["tokens"] for w in want)
    two = c.completions.create(model="tiny", prompt=["Hello", "The quick"], max_tokens=4, temperature=0, n=2)
    texts = [ch.text for ch in two.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]  # prompt-major order
    messages = [{"role": "user", "content": "Hello"}]
    chat = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=1.0, seed=3, n=2)
    assert len(chat.choices) == 2 and chat.usage.prompt_tokens < chat.usage.total_tokens
    # the samples share the prompt's KV blocks: all but one take every full block from the cache
    with Client("127.0.0.1", port, token=TOKEN, timeout=120) as nd:
        before = nd.stats()["prefix_cache_hits"]
        long = c.completions.create(model="tiny", prompt=" ".join(f"n{i}" for i in range(60)), max_tokens=2,
                                    temperature=1.0, seed=5, n=3)  # fmt: skip
        shared = nd.stats()["prefix_cache_hits"] - before
    full = (long.usage.prompt_tokens - 1) // 16 * 16  # tokens in full blocks, less the one always computed
    assert full >= 32 and shared == 2 * full, (shared, full)


def test_n_and_logprobs_on_streams_are_the_answers_without_stream(base_url: str) -> None:
    c = _oai(base_url)
    ask = {"model": "tiny", "prompt": ["Hello", "The quick"], "max_tokens": 6, "temperature": 1.0, "seed": 9, "n": 2,
           "logprobs": 2}  # fmt: skip
    whole = c.completions.create(**ask)
    chunks = list(c.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    texts, finish = {}, {}
    lps: dict[int, dict[str, list[Any]]] = {i: {"tokens": [], "lps": [], "offsets": [], "tops": []} for i in range(4)}
    with_text = dict.fromkeys(range(4), 0)  # chunks of text that carry their tokens' logprobs
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.logprobs is not None:
                got = lps[choice.index]
                got["tokens"] += choice.logprobs.tokens
                got["lps"] += choice.logprobs.token_logprobs
                got["offsets"] += choice.logprobs.text_offset
                got["tops"] += choice.logprobs.top_logprobs
                with_text[choice.index] += bool(choice.text)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [texts[i] for i in range(4)] == [ch.text for ch in whole.choices], "choice i * n + j: prompt i, sample j"
    for i, ch in enumerate(whole.choices):  # the same tokens; other rows beside them move the last float bits
        assert lps[i]["tokens"] == ch.logprobs.tokens and lps[i]["offsets"] == ch.logprobs.text_offset
        assert lps[i]["lps"] == pytest.approx(ch.logprobs.token_logprobs, abs=1e-4)
        assert [sorted(t) for t in lps[i]["tops"]] == [sorted(t) for t in ch.logprobs.top_logprobs]
        assert with_text[i] > 1, f"choice {i}: the logprobs come with the text, token by token, not at the end"
    assert sorted(finish) == [0, 1, 2, 3] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens, "each prompt counted once"
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=1, stream=True, n=2)  # fmt: skip
    chat = list(chat)
    tokens = [t.token for ch in chat if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert len(tokens) == 8, "each of the two choices' four tokens"
    carried = [ch for ch in chat if ch.choices and ch.choices[0].delta.content and ch.choices[0].logprobs]
    assert len(carried) >= 2, "each content chunk carries the logprobs of its tokens"
    roles = [ch.choices[0].index for ch in chat if ch.choices and ch.choices[0].delta.role]
    assert roles == [0, 1], "every choice's role first, in order"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"prompt": [[1], "a"]}, "prompt"),
        ("/v1/completions", {"prompt": [[]]}, "prompt"),
        ("/v1/completions", {"prompt": [10**8]}, None),  # outside the vocabulary: the engine's check
        ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "x", "truncate": 3}, "truncate"),
        ("/tokenize", {"prompt": "x", "model": "other"}, "model"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"100000000": 1}}, "logit_bias"),  # the engine's vocabulary
        ("/v1/completions", {"prompt": "x", "repetition_penalty": -1}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 99, "max_tokens": 3}, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "ignore_eos": "no"}, "ignore_eos"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "min_tokens": 2,
                "response_format": {"type": "json_object"},
            },
            "min_tokens",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 5, "stream": True}, "n"),
        ("/v1/completions", {"prompt": ["x", "y"], "n": 3}, "n"),  # 6 rows: over --max-batch-size 4
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": "abc"}, "tokens"),
    ],
)
def test_bad_values_are_a_400_naming_the_field(base_url: str, path: str, body: Any, param: str | None) -> None:
    status, answer = _post(base_url, path, {"model": "tiny", **body} if "model" not in body else body)
    assert status in (400, 404), answer
    assert answer["error"]["param"] == param, answer
    assert answer["error"]["message"]


VALUES: dict[str, list[Any]] = {
    "prompt": ["Hello", [5, 6], [[5], [6, 7]], [[]], [-3], [1.5], [True], "", [], None, [2**40], {"a": 1}],
    "stop": ["x", ["a", "b"], [], [""], ["a"] * 17, 3, None],
    "stream": [True, False, "yes", None],
    "stream_options": [{"include_usage": True}, {"include_usage": False}, {"other": 1}, [], None],
    "max_tokens": [1, 3, 0, -1, 10**9, None],
    "tokens": [[1, 2], [], [-1], ["a"], None],
    "messages": [[{"role": "user", "content": "Hi"}], [], [{"content": "x"}], None],
    "presence_penalty": [0.5, -2, 2.01, "1", None],
    "frequency_penalty": [1, -0.5, float("nan"), None],
    "repetition_penalty": [1.2, 0, 0.01, 11, None],
    "logit_bias": [{"5": 100}, {"5": -100, "6": 3}, {"-1": 1}, {"5": "x"}, {}, [], None],
    "min_tokens": [1, 3, 4, -1, None],
    "ignore_eos": [True, False, 0, None],
    "top_k": [0, 5, -1, None],
    "logprobs": [0, 2, 20, 21, -1, True, False, None],
    "n": [1, 2, 0, 5, "2", None],
    "echo": [True, False, "yes", 1, None],
    "tools": [[WEATHER], [CLOCK, WEATHER], "f", [{"type": "function"}], [{"type": "function", "function": {}}], None],
    "tool_choice": [
        "auto",
        "none",
        "required",
        {"type": "function", "function": {"name": "now"}},
        {"type": "function", "function": {"name": "x"}},
        5,
        None,
    ],
    "parallel_tool_calls": [True, False, "no", None],
    "response_format": [
        {"type": "json_object"},
        {"type": "text"},
        {"type": "yaml"},
        "json",
        [],
        None,
        {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}},
        {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(("}}},
    ],
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]))
    body: dict[str, Any] = {"model": "tiny", "max_tokens": 3} if path.startswith("/v1/") else {}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    for key in draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=4, unique=True)):
        value = draw(st.sampled_from(VALUES[key]))
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return path, body


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=bodies())
def test_no_field_value_breaks_the_job(base_url: str, case: tuple[str, dict[str, Any]]) -> None:
    path, body = case
    if path.startswith("/v1/") and body.get("stream") is True:
        body.pop("stream")  # the SSE answer is covered above; here every answer is one JSON body
        body.pop("stream_options", None)
    status, answer = _post(base_url, path, body)
    assert status in (200, 400), (path, body, answer)
    if status == 400:
        assert answer["error"]["code"] == "bad_request" and answer["error"]["message"], answer


def test_the_job_never_restarted_after_the_fields(base_url: str) -> None:
    req = urllib.request.Request(base_url.removesuffix("/v1") + "/health", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["restarts"] == 0
