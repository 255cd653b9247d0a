"""The reference server over real HTTP on loopback: concurrent streams equal their offline results,
no token lost or duplicated, an abort mid-stream leaves the others alone, bad requests get a 4xx."""

from __future__ import annotations

import itertools
import json
import threading
import time

import httpx
import pytest

from s2d_ext.engine import SamplingParams

from ..engine.helpers import run_alone


def _stream(url, body, stop_after=None):
    """POST a streaming request; returns (chunks, finish reason). ``stop_after``: close after n chunks."""
    chunks, reason = [], None
    with httpx.Client(timeout=120) as client, client.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            chunks.append(chunk)
            if chunk["choices"]:  # NOTE: the include_usage chunk has none
                reason = chunk["choices"][0].get("finish_reason") or reason
            if stop_after is not None and len(chunks) >= stop_after:
                return chunks, "client closed"
    return chunks, reason


BODIES = [
    dict(prompt=[5, 9, 17, 2], max_tokens=24, temperature=0, return_token_ids=True),
    dict(prompt=[7, 1, 8], max_tokens=30, temperature=1.0, seed=3, return_token_ids=True),
    dict(prompt="def add(a, b):", max_tokens=20, temperature=0.8, top_k=20, seed=4, return_token_ids=True),
    dict(prompt=[3, 3, 3, 3, 3, 3], max_tokens=16, temperature=1.2, top_p=0.9, seed=5, return_token_ids=True),
    dict(prompt=[40, 41], max_tokens=28, temperature=0.7, min_p=0.05, seed=6, return_token_ids=True),
    dict(
        prompt=[11, 12, 13],
        max_tokens=12,
        temperature=1.0,
        repetition_penalty=1.3,
        seed=7,
        return_token_ids=True,
    ),
]


def _offline(make, tokenizer, body):
    prompt = body["prompt"] if isinstance(body["prompt"], list) else tokenizer.encode(body["prompt"])
    params = SamplingParams(
        max_new_tokens=body["max_tokens"],
        temperature=float(body["temperature"]),
        top_k=body.get("top_k", 0),
        top_p=body.get("top_p", 1.0),
        min_p=body.get("min_p", 0.0),
        repetition_penalty=body.get("repetition_penalty", 1.0),
        seed=body.get("seed"),
    )
    return run_alone(make, prompt, params)


def test_concurrent_streams_equal_their_offline_results(served):
    url, engine, make, tokenizer = served
    results = [None] * len(BODIES)

    def worker(i):
        results[i] = _stream(f"{url}/v1/completions", BODIES[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(BODIES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for body, (chunks, reason) in zip(BODIES, results):
        ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        offline = _offline(make, tokenizer, body)
        assert ids == offline["tokens"]  # no token lost, duplicated or changed
        assert text == tokenizer.decode(ids)
        assert reason == "length" == ("length" if offline["reason"] == "length" else reason)
    assert engine.num_unfinished == 0


def test_non_streaming_and_chat(served):
    url, _, make, tokenizer = served
    body = dict(BODIES[1])
    with httpx.Client(timeout=120) as client:
        whole = client.post(f"{url}/v1/completions", json=body).json()
        assert whole["object"] == "text_completion"
        assert whole["choices"][0]["token_ids"] == _offline(make, tokenizer, body)["tokens"]
        assert whole["usage"]["completion_tokens"] == body["max_tokens"]
        chat = dict(messages=[{"role": "user", "content": "hi"}], max_tokens=10, temperature=0.9, seed=2)
        reply = client.post(f"{url}/v1/chat/completions", json={**chat, "return_token_ids": True}).json()
        assert reply["object"] == "chat.completion"
        prompt = tokenizer.encode("user: hi\nassistant:")
        offline = run_alone(make, prompt, SamplingParams(max_new_tokens=10, temperature=0.9, seed=2))
        assert reply["choices"][0]["message"]["content"] == tokenizer.decode(offline["tokens"])
        lp = client.post(f"{url}/v1/completions", json={**BODIES[0], "logprobs": 2}).json()
        logprobs = lp["choices"][0]["logprobs"]
        assert len(logprobs["token_logprobs"]) == 24 and all(len(t) == 2 for t in logprobs["top_logprobs"])
        assert client.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny"
    chunks, _ = _stream(f"{url}/v1/chat/completions", {**chat, "return_token_ids": True})
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    ids = [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]]
    assert ids == offline["tokens"]


def test_an_abort_mid_stream_leaves_the_others_unaffected(served):
    url, engine, make, tokenizer = served
    aborted_before = engine.aborted
    long = dict(prompt=[9, 8, 7], max_tokens=200, temperature=1.0, seed=9, return_token_ids=True)
    results = {}

    def worker(name, body, stop_after=None):
        results[name] = _stream(f"{url}/v1/completions", body, stop_after)

    threads = [
        threading.Thread(target=worker, args=("quitter", long, 2)),
        threading.Thread(target=worker, args=("a", BODIES[1])),
        threading.Thread(target=worker, args=("b", BODIES[3])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["quitter"][1] == "client closed"
    for name, body in (("a", BODIES[1]), ("b", BODIES[3])):
        ids = [t for c in results[name][0] for t in c["choices"][0]["token_ids"]]
        assert ids == _offline(make, tokenizer, body)["tokens"]
    deadline = time.monotonic() + 30
    while engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_unfinished == 0  # the quitter did not run to its 200 tokens
    assert engine.aborted == aborted_before + 1
    streamed = [t for c in results["quitter"][0] for t in c["choices"][0]["token_ids"]]
    full = _offline(make, tokenizer, long)["tokens"]
    assert streamed == full[: len(streamed)] and len(streamed) < len(full)


@pytest.mark.parametrize(
    "path,body,status,match",
    [
        ("/v1/completions", dict(prompt=[1, 2], max_tokens=0), 400, "max_tokens must be"),
        ("/v1/completions", dict(prompt=[1, 2], temperature=-1), 400, "temperature"),
        ("/v1/completions", dict(prompt=[1, 2], top_p=1.5), 400, "top_p"),
        ("/v1/completions", dict(prompt=[1, 200]), 400, "prompt must hold token ids"),
        ("/v1/completions", dict(prompt=list(range(1, 90)) * 3, max_tokens=4), 400, "longer than"),
        ("/v1/completions", dict(prompt=[1, 2], max_tokens=300), 400, "max_tokens=300"),
        ("/v1/completions", dict(prompt=[1, 2], n=17), 400, "n must be in [1, 16]"),
        ("/v1/completions", dict(prompt=[1, 2], presence_penalty=2.5), 400, "presence_penalty"),
        ("/v1/completions", dict(prompt=[1, 2], best_of=True), 400, "best_of"),  # True == 1 in Python
        ("/v1/completions", dict(prompt=[1, 2], frobnicate=1), 400, "frobnicate"),
        ("/v1/completions", dict(max_tokens=3), 400, "prompt"),
        ("/v1/completions", dict(prompt=[1, 2], model="gpt-9"), 404, "gpt-9"),
        ("/v1/chat/completions", dict(messages=[]), 400, "messages"),
        ("/v1/chat/completions", dict(messages=[{"role": "user"}]), 400, "content"),
        ("/v1/completions", "not json", 400, "JSON"),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message(served, path, body, status, match):
    url, engine, _, _ = served
    with httpx.Client(timeout=60) as client:
        if isinstance(body, str):
            r = client.post(f"{url}{path}", content=body, headers={"content-type": "application/json"})
        else:
            r = client.post(f"{url}{path}", json=body)
        assert r.status_code == status, r.text
        assert match in r.json()["error"]["message"]
        assert client.get(f"{url}/health").json()["status"] == "ok"  # the server carries on


def test_serve_command_refuses_incomplete_arguments(capsys):
    from s2d_ext.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--family", "tiny", "--port", "9001", "--max-running", "8"])
    assert args.family == "tiny" and args.port == 9001 and args.max_running == 8
    for argv in (["serve"], ["serve", "--target", "T"], ["serve", "--family", "tiny", "--target", "T"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "--draft" in capsys.readouterr().err


def _greedy_steps(make, prompt, max_tokens):
    """The per-step token chunks of a greedy request run alone."""
    engine = make()
    engine.add_request(prompt, SamplingParams(max_new_tokens=max_tokens))
    chunks = []
    while engine.has_unfinished():
        chunks += [o.new_token_ids for o in engine.step() if o.new_token_ids]
    return chunks


def test_text_stream_holds_back_a_stop_string_split_across_steps():
    from s2d_ext.server.detokenize import TextStream

    from .conftest import CharTokenizer

    tok = CharTokenizer()
    text = TextStream(tok, ["in", "xyz"])
    assert text.add(tok.encode("!!&[i")) == "!!&"  # "[i" may begin "xyz" / "in": held back
    assert text.add(tok.encode("n&i")) == "["
    assert text.stopped and text.num_tokens == 6  # "!!&[i" + "n": the token completing the stop
    assert text.add(tok.encode("more"), final=True) == ""
    flush = TextStream(tok, ["in"])
    assert flush.add(tok.encode("ab")) == "a" and flush.add(tok.encode("ci"), final=True) == "bci"
    assert not flush.stopped and flush.num_tokens == 4


def test_text_stream_ignores_stop_strings_within_min_tokens():
    # vLLM's rule: a stop string completed before min_tokens tokens were generated does not stop.
    from s2d_ext.server.detokenize import TextStream

    from .conftest import CharTokenizer

    tok = CharTokenizer()
    whole = TextStream(tok, ["in"], min_tokens=5)
    assert whole.add(tok.encode("abinxinyy")) == "abinx"  # the first "in" ends at token 4 < 5
    assert whole.stopped and whole.num_tokens == 7
    steps = TextStream(tok, ["in"], min_tokens=5)
    assert "".join(steps.add(tok.encode(c)) for c in "abinxinyy") == "abinx" and steps.num_tokens == 7
    at_min = TextStream(tok, ["in"], min_tokens=4)  # the 4th token completes "in": it counts
    assert at_min.add(tok.encode("abinx")) == "ab" and at_min.num_tokens == 4


def test_a_stop_string_across_two_steps_is_cut_with_its_tokens(served):
    url, _, make, tokenizer = served
    prompt = [5, 9, 17, 2]
    chunks = _greedy_steps(make, prompt, 24)
    full = tokenizer.decode([t for c in chunks for t in c])
    # a two-character stop string whose first occurrence straddles two steps (each a char a token)
    ends = list(itertools.accumulate(len(c) for c in chunks))[:-1]
    stop = next(full[e - 1 : e + 1] for e in ends if full.find(full[e - 1 : e + 1]) == e - 1)
    at = full.find(stop)
    ids = tokenizer.encode(full[: at + len(stop)])  # through the token that completes the stop
    body = dict(prompt=prompt, max_tokens=24, temperature=0, stop=[stop], return_token_ids=True, logprobs=1)
    with httpx.Client(timeout=120) as client:
        whole = client.post(f"{url}/v1/completions", json=body).json()
    choice = whole["choices"][0]
    assert choice["text"] == full[:at] and choice["finish_reason"] == "stop"
    assert choice["token_ids"] == ids
    assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"]) == len(ids)
    assert whole["usage"]["completion_tokens"] == len(ids)
    streamed, reason = _stream(f"{url}/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert reason == "stop"
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == full[:at]
    assert [t for c in streamed[:-1] for t in c["choices"][0]["token_ids"]] == ids
    assert sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in streamed[:-1]) == len(ids)
    assert streamed[-1]["usage"]["completion_tokens"] == len(ids)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_filtered_out_logprobs_are_clamped_to_valid_json(served, path):
    url, _, _, _ = served
    chat = path.endswith("chat/completions")
    body = dict(max_tokens=3, temperature=1.0, top_k=2, seed=1)
    if chat:  # top_k=2 leaves -inf for the 3rd and 4th most probable tokens
        body.update(messages=[{"role": "user", "content": "hi"}], logprobs=True, top_logprobs=4)
    else:
        body.update(prompt=[1, 2, 3], logprobs=4)

    def values(choice):
        if chat:
            return [t["logprob"] for e in choice["logprobs"]["content"] for t in e["top_logprobs"]]
        return [v for top in choice["logprobs"]["top_logprobs"] for v in top.values()]

    with httpx.Client(timeout=60) as client:
        r = client.post(f"{url}{path}", json=body)
    assert r.status_code == 200, r.text
    whole = values(r.json()["choices"][0])
    assert -9999.0 in whole and all(v >= -9999.0 for v in whole)
    chunks, _ = _stream(f"{url}{path}", body)  # json.loads would take -Infinity: check the raw values
    streamed = [v for c in chunks if c["choices"][0].get("logprobs") for v in values(c["choices"][0])]
    assert streamed == whole


def _refused(url, path, body):
    """POST ``body``; asserts a 4xx whose error names a parameter and that the server carries on."""
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{url}{path}", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert client.get(f"{url}/health").json()["status"] == "ok"
    return r.json()["error"]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", dict(prompt=[1, 2, 3], model=["tiny"]), "model"),
        ("/v1/completions", dict(prompt=[1, 2, 3], stop=5), "stop"),
        ("/v1/completions", dict(prompt=[1, 2, 3], stop={"x": 1}), "stop"),
        ("/v1/completions", dict(prompt=[1, 2, 3], stream=True, stream_options=True), "stream_options"),
        (
            "/v1/chat/completions",
            dict(messages=[{"role": "user", "content": "hi"}], stream=True, stream_options=[1]),
            "stream_options",
        ),
        (
            "/v1/completions",
            dict(prompt=[1, 2, 3], stream=True, stream_options={"include_usage": "yes"}),
            "stream_options.include_usage",
        ),
        ("/v1/completions", dict(prompt=[1, 2, 3], user=7), "user"),
    ],
)
def test_fields_of_the_wrong_type_get_a_400_naming_them(served, path, body, param):
    url, _, _, _ = served
    error = _refused(url, path, {"max_tokens": 3, **body})
    assert error["param"] == param and param in error["message"]


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", dict(prompt=[1, 2, 3], stream_options={"include_usage": True}), "stream_options"),
        (
            "/v1/completions",
            dict(prompt=[1, 2, 3], stream=True, stream_options={"include_obfuscation": True}),
            "stream_options",
        ),
        ("/v1/chat/completions", dict(messages=HI, tool_choice="required"), "tool_choice"),
        ("/v1/chat/completions", dict(messages=HI, tool_choice={"type": "function"}), "tool_choice"),
        ("/v1/completions", dict(prompt=[1, 2, 3], top_k=-5), "top_k"),
        ("/v1/completions", dict(prompt=[1, 2, 3], min_tokens=10), "min_tokens"),
        ("/v1/completions", dict(prompt=[1, 2, 3], logit_bias=[]), "logit_bias"),
        ("/v1/completions", dict(prompt=[1, 2, 3], logit_bias={"96": 10}), "logit_bias"),  # V = 96
        ("/v1/completions", dict(prompt=[1, 2, 3], logit_bias={"x": 10}), "logit_bias"),
        ("/v1/completions", dict(prompt=[1, 2, 3], logit_bias={"5": 101}), "logit_bias"),
    ],
)
def test_fields_that_would_be_ignored_get_a_400(served, path, body, param):
    url, _, _, _ = served
    error = _refused(url, path, {"max_tokens": 3, **body})
    assert error["param"] == param and param in error["message"]


def test_no_op_values_are_accepted_as_such(served):
    url, _, _, _ = served
    base = dict(prompt=[1, 2, 3], max_tokens=3, temperature=1.0, seed=11, return_token_ids=True)
    with httpx.Client(timeout=60) as client:
        ids = client.post(f"{url}/v1/completions", json=base).json()["choices"][0]["token_ids"]
        for extra in (dict(logit_bias={}), dict(top_k=-1), dict(top_k=0), dict(min_tokens=3)):
            r = client.post(f"{url}/v1/completions", json={**base, **extra})
            assert r.status_code == 200, (extra, r.text)
            assert r.json()["choices"][0]["token_ids"] == ids, extra
        chat = dict(messages=HI, max_tokens=3, tool_choice="none", parallel_tool_calls=False)
        assert client.post(f"{url}/v1/chat/completions", json=chat).status_code == 200


def test_chat_without_max_tokens_asks_for_what_the_context_leaves(served):
    url, engine, _, tokenizer = served
    context = engine.engine.configs["tiny"].model.config.max_position_embeddings  # 256
    prompt = len(tokenizer.encode("user: hi\nassistant:"))
    with httpx.Client(timeout=120) as client:
        r = client.post(f"{url}/v1/chat/completions", json=dict(messages=HI, temperature=0))
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == context - prompt
        assert r.json()["choices"][0]["finish_reason"] == "length"
    full = [{"role": "user", "content": "x" * (context - prompt + 2)}]  # the prompt alone fills it
    error = _refused(url, "/v1/chat/completions", dict(messages=full))
    assert error["param"] == "messages" and "context" in error["message"]


def test_chat_default_max_tokens_without_a_known_context():
    from s2d_ext.server.protocol import DEFAULT_CHAT_TOKENS, parse

    from .conftest import CharTokenizer

    body = dict(messages=HI)
    assert parse(body, CharTokenizer(), chat=True).params.max_new_tokens == DEFAULT_CHAT_TOKENS
    assert parse(body, CharTokenizer(), chat=True, context=100).params.max_new_tokens == 100 - 19
    assert parse(dict(prompt="hi"), CharTokenizer(), chat=False, context=100).params.max_new_tokens == 16


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", dict(prompt=[1, 2], max_tokens=0), "max_tokens"),
        ("/v1/completions", dict(prompt=[1, 2], max_tokens=300), "max_tokens"),  # the engine's check
        ("/v1/chat/completions", dict(messages=HI, max_completion_tokens=0), "max_completion_tokens"),
        ("/v1/chat/completions", dict(messages=HI, max_completion_tokens="5"), "max_completion_tokens"),
        ("/v1/chat/completions", dict(messages=HI, max_tokens=300), "max_tokens"),
        ("/v1/completions", dict(prompt=[1, 2], bad_words=[""]), "bad_words"),
        ("/v1/completions", dict(prompt=[1, 2], min_tokens=-1), "min_tokens"),
        ("/v1/completions", dict(prompt=[1, 200]), "prompt"),
        ("/v1/completions", dict(prompt=list(range(1, 90)) * 3, max_tokens=4), "prompt"),
        ("/v1/completions", dict(prompt=[1, 2], stop_token_ids=[500]), "stop_token_ids"),
        ("/v1/completions", dict(prompt=[1, 2], allowed_token_ids="ab"), "allowed_token_ids"),
        ("/v1/completions", dict(prompt=[1, 2], seed=2**64), "seed"),
        ("/v1/completions", dict(prompt=[1, 2], max_tokens=-1), "max_tokens"),  # not min_tokens
        ("/v1/chat/completions", dict(messages=HI, logprobs=True, top_logprobs=25), "top_logprobs"),
        ("/v1/completions", dict(prompt=[1, 2], logprobs=25), "logprobs"),
    ],
)
def test_errors_name_the_request_field_not_the_engine_parameter(served, path, body, param):
    url, _, _, _ = served
    error = _refused(url, path, body)
    assert error["param"] == param and param in error["message"]
    for internal in ("max_new_tokens", "min_new_tokens", "bad_words_ids", "prompt_ids"):
        assert internal not in error["message"]


def test_one_server_two_targets_one_draft():
    """s2d serve with two targets and one draft: the request's model picks the target, every answer is what
    that target gives alone, and an unknown model is a 404 naming the served ones."""
    import torch

    from s2d_ext.draft.sorted_draft import SortedDraft
    from s2d_ext.engine import Engine
    from s2d_ext.server.app import build_app
    from s2d_ext.server.async_engine import AsyncEngine
    from s2d_ext.server.launch import serving_in_thread

    from ..driver.tiny_models import make_target
    from .conftest import CharTokenizer

    torch.set_num_threads(1)
    targets = {
        "small": make_target("llama", layers=3, seed=5),
        "large": make_target("llama", layers=4, seed=6),
    }
    draft = SortedDraft.truncate(targets["small"], 2, exits=(1, 2), thresholds=(0.5, 0.0))
    make = lambda: Engine(draft, targets)  # noqa: E731
    engine, tokenizer = AsyncEngine(make()), CharTokenizer()
    body = {"prompt": "def f(x):", "max_tokens": 12, "temperature": 0.8, "seed": 4, "return_token_ids": True}
    try:
        with serving_in_thread(build_app(engine, tokenizer)) as url, httpx.Client(timeout=120) as client:
            assert {m["id"] for m in client.get(f"{url}/v1/models").json()["data"]} == {"small", "large"}
            for name in targets:
                reply = client.post(f"{url}/v1/completions", json={**body, "model": name}).json()
                params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=4)
                alone = run_alone(make, tokenizer.encode(body["prompt"]), params, target=name)
                assert reply["model"] == name and reply["choices"][0]["token_ids"] == alone["tokens"]
            missing = client.post(f"{url}/v1/completions", json={**body, "model": "medium"})
            assert missing.status_code == 404 and "small" in missing.text and "large" in missing.text
    finally:
        engine.close()
