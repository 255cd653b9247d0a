"""The OpenAI surface with the real ``openai`` client on loopback: n > 1, prompt lists, echo, penalties and
logit_bias, structured output (response_format, vLLM's guided fields), tools, operations endpoints, and
bad input that gets a 400 naming its field while the other requests carry on."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from s2d_ext.draft.sorted_draft import SortedDraft
from s2d_ext.engine import Engine, SamplingParams

from ..driver.tiny_models import make_target
from ..engine.grammar_helpers import EOS, CharEosTokenizer
from ..engine.helpers import run_alone

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "tag": {"enum": ["red", "green"]}},
    "required": ["id", "tag"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
HI = [{"role": "user", "content": "hi"}]
# NOTE: the random model loves spaces (id 0), which JSON allows anywhere: a bias keeps them out
NOSPACE = {"0": -100}


@pytest.fixture(scope="module")
def server():
    """(client, url, make_engine, tokenizer, async engine): caps n <= 4, 3 prompts a request."""
    from s2d_ext.server.app import build_app
    from s2d_ext.server.async_engine import AsyncEngine
    from s2d_ext.server.launch import serving_in_thread

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    target = make_target("llama", seed=3)
    target.generation_config.eos_token_id = EOS
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    make = lambda: Engine(draft, {"tiny": target})  # noqa: E731
    engine = AsyncEngine(make())
    tokenizer = CharEosTokenizer()
    with serving_in_thread(build_app(engine, tokenizer, max_n=4, max_prompts=3)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        yield client, url, make, tokenizer, engine
    engine.close()
    torch.set_num_threads(previous)


def _alone(make, prompt, **params):
    return run_alone(make, prompt, SamplingParams(**params), target="tiny")["tokens"]


def test_n_choices_are_independent_and_choice_i_uses_seed_plus_i(server):
    client, _, make, tokenizer, _ = server
    prompt = [5, 9, 17, 2]
    got = client.completions.create(
        model="tiny",
        prompt=prompt,
        max_tokens=12,
        temperature=1.0,
        seed=40,
        n=3,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in got.choices] == [0, 1, 2]
    texts = [c.text for c in got.choices]
    for i, text in enumerate(texts):
        ids = _alone(make, prompt, max_new_tokens=12, temperature=1.0, seed=40 + i, eos_token_id=[])
        assert text == tokenizer.decode(ids)
    assert len(set(texts)) == 3
    assert got.usage.prompt_tokens == 4 and got.usage.completion_tokens == 36


def test_a_list_of_text_and_token_id_prompts_in_one_request(server):
    client, _, make, tokenizer, _ = server
    prompts = ["def f(x):", [7, 1, 8, 2]]
    got = client.completions.create(
        model="tiny", prompt=prompts, max_tokens=8, temperature=0, n=2, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in got.choices] == [0, 1, 2, 3]  # prompt p, choice i: index p * n + i
    for p, prompt in enumerate(prompts):
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)
        want = tokenizer.decode(_alone(make, ids, max_new_tokens=8, eos_token_id=[]))
        assert got.choices[2 * p].text == got.choices[2 * p + 1].text == want  # greedy: both equal
    assert got.usage.prompt_tokens == len(tokenizer.encode(prompts[0])) + 4


def test_echo_returns_the_prompt_and_its_logprobs(server):
    client, _, make, tokenizer, engine = server
    prompt = "abc de"
    got = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    choice = got.choices[0]
    ids = tokenizer.encode(prompt)
    new = _alone(make, ids, max_new_tokens=4)
    assert choice.text == prompt + tokenizer.decode(new)
    lp = choice.logprobs
    assert lp.tokens == [tokenizer.decode([t]) for t in ids + new]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    model = engine.engine.configs["tiny"].model
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(want[i - 1, ids[i]].item(), abs=1e-4)
        assert len(lp.top_logprobs[i]) == 2
    assert len(lp.token_logprobs) == len(ids) + 4
    streamed = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_penalties_and_logit_bias_match_the_engine(server):
    client, _, make, tokenizer, _ = server
    prompt = [5, 9, 17, 2, 5, 9]
    settings = dict(presence_penalty=1.2, frequency_penalty=0.8, logit_bias={"40": 5.0, "7": -100})
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, **settings)
    ids = _alone(
        make,
        prompt,
        max_new_tokens=20,
        presence_penalty=1.2,
        frequency_penalty=0.8,
        logit_bias={40: 5.0, 7: -100.0},
    )
    assert got.choices[0].text == tokenizer.decode(ids)
    assert 7 not in ids
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert plain.choices[0].text != got.choices[0].text


def test_response_format_json_schema_and_json_object(server):
    client, _, _, _, _ = server
    fmt = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
    got = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=60, temperature=0, response_format=fmt, logit_bias=NOSPACE
    )
    assert got.choices[0].finish_reason == "stop"
    value = json.loads(got.choices[0].message.content)
    jsonschema.validate(value, SCHEMA)
    chunks = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=60,
        temperature=0,
        response_format=fmt,
        stream=True,
        logit_bias=NOSPACE,
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == got.choices[0].message.content
    sampled = client.chat.completions.create(
        model="tiny", messages=HI, max_tokens=80, temperature=1.0, seed=5, n=3, response_format=fmt
    )
    for c in sampled.choices:
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
    obj = client.completions.create(
        model="tiny",
        prompt="{",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].text), dict)
    else:
        assert obj.choices[0].text.startswith("{")


def test_vllm_guided_fields(server):
    client, _, _, _, _ = server
    for seed in range(3):
        got = client.completions.create(
            model="tiny",
            prompt=[1, 2, 3],
            max_tokens=10,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_choice": ["alpha", "beta", "gamma"]},
        )
        assert got.choices[0].text in ("alpha", "beta", "gamma")
    got = client.completions.create(
        model="tiny",
        prompt=[1, 2, 3],
        max_tokens=12,
        temperature=0,
        extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"},
    )
    text = got.choices[0].text
    assert len(text) == 6 and text[:3].isdigit() and text[3] == "-" and text[4:].isalpha()
    got = client.completions.create(
        model="tiny",
        prompt=[1, 2, 3],
        max_tokens=12,
        temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert got.choices[0].text in ("yes", "no")


def test_tools_required_and_named_give_tool_calls(server):
    client, _, _, _, _ = server
    named = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=80,
        temperature=0,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        logit_bias=NOSPACE,
    )
    message = named.choices[0].message
    assert message.tool_calls and message.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(
        json.loads(message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"]
    )
    required = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=120,
        temperature=0,
        tools=[WEATHER],
        tool_choice="required",
        logit_bias=NOSPACE,
    )
    choice = required.choices[0]
    if choice.finish_reason == "tool_calls":
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    else:  # cut by max_tokens: the partial JSON comes back as text
        assert choice.finish_reason == "length" and choice.message.content.startswith("[")
    streamed = client.chat.completions.create(
        model="tiny",
        messages=HI,
        max_tokens=80,
        temperature=0,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream=True,
        logit_bias=NOSPACE,
    )
    arguments = "".join(
        c.choices[0].delta.tool_calls[0].function.arguments or ""
        for c in streamed
        if c.choices and c.choices[0].delta.tool_calls
    )
    assert arguments == message.tool_calls[0].function.arguments


@pytest.mark.parametrize(
    "endpoint, body, param, words",
    [
        (
            "chat",
            dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "banana"}}}),
            "response_format",
            "banana",
        ),
        (
            "chat",
            dict(
                response_format={
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "integer", "minimum": 3, "maximum": 1}},
                }
            ),
            "response_format",
            "Unsatisfiable",
        ),
        ("completions", dict(extra_body={"guided_regex": "[a-"}), "guided_regex", "regex"),
        ("completions", dict(extra_body={"guided_choice": []}), "guided_choice", "guided_choice"),
        ("completions", dict(logit_bias={"96": 1}), "logit_bias", "vocabulary"),
        ("completions", dict(n=5), "n", "n must be in [1, 4]"),
        ("completions", dict(prompt=["a", "b", "c", "d"]), "prompt", "at most 3 prompts"),
        ("chat", dict(tools=[WEATHER], tool_choice="auto"), "tool_choice", "auto"),
        (
            "chat",
            dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice",
            "nope",
        ),
        (
            "completions",
            dict(extra_body={"guided_json": SCHEMA, "guided_regex": "a"}),
            "guided_regex",
            "at most one",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_others_carry_on(server, endpoint, body, param, words):
    client, _, make, tokenizer, _ = server
    good = {}

    def neighbour():
        good["got"] = client.completions.create(
            model="tiny", prompt=[4, 4, 2], max_tokens=16, temperature=0.8, seed=2
        )

    thread = threading.Thread(target=neighbour)
    thread.start()
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, **body)
        else:
            client.completions.create(model="tiny", **{"prompt": [1, 2], "max_tokens": 8, **body})
    thread.join()
    error = info.value.body
    assert error["param"] == param and words in error["message"], error
    ids = _alone(make, [4, 4, 2], max_new_tokens=16, temperature=0.8, seed=2)
    assert good["got"].choices[0].text == tokenizer.decode(ids)


def test_health_version_and_metrics(server):
    client, url, _, _, _ = server
    import httpx

    with httpx.Client(timeout=60) as http:
        assert http.get(f"{url}/health").json()["status"] == "ok"
        assert http.get(f"{url}/version").json()["version"]
        before = http.get(f"{url}/metrics").text
        client.completions.create(model="tiny", prompt=[3, 4, 5], max_tokens=10, temperature=0)
        after = http.get(f"{url}/metrics").text

    def value(text, name):
        line = next(x for x in text.splitlines() if x.startswith(name))
        return float(line.rsplit(" ", 1)[1])

    assert value(after, 's2d_requests_total{endpoint="completions",status="200"}') >= 1
    assert value(after, "s2d_generation_tokens_total") == value(before, "s2d_generation_tokens_total") + 10
    assert value(after, "s2d_draft_tokens_proposed_total") > value(before, "s2d_draft_tokens_proposed_total")
    names = (
        "s2d_draft_tokens_accepted_total",
        "s2d_engine_steps_total",
        's2d_step_seconds_total{part="step"}',
        's2d_draft_acceptance_by_position{position="0"}',
        "s2d_queue_length",
        "s2d_requests_running",
    )
    for name in names:
        assert name in after
