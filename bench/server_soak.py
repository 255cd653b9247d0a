"""Soak: ``--requests`` mixed requests against ``s2d serve``'s app on loopback; does memory stop growing?

The server runs in a child process (this script with ``--serve``: a tiny random Llama target and its
2-layer sorted draft, a character tokenizer with an EOS, one torch thread). This process sends the
requests from ``--concurrency`` workers, cycling through a fixed mix: plain and streamed completions,
streams the client drops after two chunks (aborted), chat with a JSON schema, ``n=2`` with a seed, echo
with logprobs, guided_choice, a named tool, and malformed ones (bad JSON, an unknown field, an invalid
schema, a logit_bias id outside the vocabulary). The child's resident memory (``VmRSS``) and thread count
are read from ``/proc`` after request 100 and after the last; at the end ``/health`` must show no request
left in the engine. Writes ``bench/results/server_soak_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import load, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "tag": {"enum": ["red", "green"]}},
    "required": ["id", "tag"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}},
    },
}
HI = [{"role": "user", "content": "hi"}]
NOSPACE = {"0": -100}


def mix(i: int) -> tuple[str, str, object, str]:
    """(kind, path, body, how) of request i: how is "whole", "stream" or "drop" (close after 2 chunks)."""
    seed = i
    kinds = [
        ("completion", "/v1/completions", dict(prompt=[5, 9, 17, i % 90], max_tokens=12, seed=seed), "whole"),
        (
            "stream",
            "/v1/completions",
            dict(prompt="def f(x):", max_tokens=16, stream=True, seed=seed),
            "stream",
        ),
        ("aborted", "/v1/completions", dict(prompt=[7, 1, 8], max_tokens=40, stream=True, seed=seed), "drop"),
        (
            "json_schema",
            "/v1/chat/completions",
            dict(
                messages=HI,
                max_tokens=30,
                seed=seed,
                logit_bias=NOSPACE,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}},
            ),
            "whole",
        ),
        ("n2", "/v1/completions", dict(prompt=["ab", [3, 4]], max_tokens=8, n=2, seed=seed), "whole"),
        (
            "echo",
            "/v1/completions",
            dict(prompt="abc", max_tokens=6, echo=True, logprobs=2, seed=seed),
            "whole",
        ),
        (
            "choice",
            "/v1/completions",
            dict(prompt=[1, 2], max_tokens=8, guided_choice=["yes", "no"]),
            "whole",
        ),
        (
            "tool",
            "/v1/chat/completions",
            dict(
                messages=HI,
                max_tokens=30,
                tools=[TOOL],
                logit_bias=NOSPACE,
                tool_choice={"type": "function", "function": {"name": "lookup"}},
                stream=True,
            ),
            "stream",
        ),
        ("bad_json", "/v1/completions", "{not json", "whole"),
        ("bad_field", "/v1/completions", dict(prompt=[1], frobnicate=1), "whole"),
        (
            "bad_schema",
            "/v1/chat/completions",
            dict(
                messages=HI, response_format={"type": "json_schema", "json_schema": {"schema": {"type": 1}}}
            ),
            "whole",
        ),
        ("bad_bias", "/v1/completions", dict(prompt=[1], logit_bias={"96": 1}), "whole"),
    ]
    return kinds[i % len(kinds)]


def serve(port: int) -> None:
    """The child: the app over a tiny random model on 127.0.0.1:port."""
    import torch

    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from python_tests.driver.tiny_models import make_target
    from python_tests.engine.grammar_helpers import EOS, CharEosTokenizer
    from s2d_ext.draft.sorted_draft import SortedDraft
    from s2d_ext.engine import Engine
    from s2d_ext.server.app import build_app
    from s2d_ext.server.async_engine import AsyncEngine
    from s2d_ext.server.launch import serve as run

    target = make_target("llama", seed=3)
    target.generation_config.eos_token_id = EOS
    draft = SortedDraft.truncate(target, 2, exits=(1, 2), thresholds=(0.5, 0.0))
    engine = AsyncEngine(Engine(draft, {"tiny": target}))
    run(build_app(engine, CharEosTokenizer()), "127.0.0.1", port)


def proc_status(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return fields  # VmRSS in kB


async def one(client, url: str, i: int) -> tuple[str, int]:
    kind, path, body, how = mix(i)
    if isinstance(body, str):
        r = await client.post(url + path, content=body, headers={"content-type": "application/json"})
        return kind, r.status_code
    if how == "whole":
        r = await client.post(url + path, json=body)
        r.json()
        return kind, r.status_code
    async with client.stream("POST", url + path, json=body) as r:
        chunks = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                chunks += 1
                if how == "drop" and chunks >= 2:
                    break  # NOTE: leaving the block closes the connection: the server aborts the request
        return kind, r.status_code


async def soak(url: str, pid: int, total: int, concurrency: int) -> dict:
    import httpx

    counter = iter(range(total))
    done = 0
    samples = {}
    statuses: collections.Counter = collections.Counter()
    async with httpx.AsyncClient(timeout=120) as client:

        async def worker():
            nonlocal done
            for i in counter:
                kind, status = await one(client, url, i)
                statuses[f"{kind} {status}"] += 1
                done += 1
                if done in (100, total // 2, total):
                    samples[done] = proc_status(pid)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        deadline = time.monotonic() + 30
        health = (await client.get(url + "/health")).json()
        while health["unfinished"] and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            health = (await client.get(url + "/health")).json()
        samples["end"] = proc_status(pid)
    return {"statuses": dict(sorted(statuses.items())), "proc": samples, "health": health}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.5)
        meta = {"machine": machine(1), "load_start": load()}
        start = time.perf_counter()
        result = asyncio.run(soak(url, child.pid, args.requests, args.concurrency))
        result["seconds"] = time.perf_counter() - start
        meta["load_end"] = load()
    finally:
        child.terminate()
        child.wait(timeout=30)
    proc = result["proc"]
    growth = proc[args.requests]["VmRSS"] / proc[100]["VmRSS"] - 1
    payload = {
        **meta,
        "requests": args.requests,
        "concurrency": args.concurrency,
        **result,
        "rss_growth": growth,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "server_soak_cpu.json").write_text(json.dumps(payload, indent=2))
    half = args.requests // 2
    lines = [
        "# Server soak (CPU)",
        "",
        f"Machine: {meta['machine']}; {meta['load_start']} at the start, {meta['load_end']} at the end.",
        f"{args.requests} mixed requests, {args.concurrency} concurrent workers, "
        f"in {result['seconds']:.0f} s, "
        "against the app in a child process (tiny random Llama + 2-layer sorted draft, one torch thread).",
        "",
        "| after request | server RSS (MiB) | server threads |",
        "|---|---|---|",
    ]
    for key in [*sorted({100, half, args.requests}), "end"]:
        lines.append(f"| {key} | {proc[key]['VmRSS'] / 1024:.1f} | {proc[key]['Threads']} |")
    lines += [
        "",
        f"RSS after request {args.requests} vs after request 100: **{100 * growth:+.2f}%** "
        "(goal: within 5%).",
        f"`/health` at the end: {json.dumps(result['health'])} (requests left in the engine: "
        f"{result['health']['unfinished']}).",
        "",
        "| request kind and status | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in result["statuses"].items()],
        "",
    ]
    (args.out / "server_soak_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
