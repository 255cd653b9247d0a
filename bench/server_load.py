"""Server load: ``--concurrency`` streaming requests at once against ``s2d serve`` on loopback.

The server runs as a process of its own (``python -m s2d_ext serve --family bench``, one torch thread);
this process sends every request at once (httpx, asyncio), each with its own seed, ``--max-tokens`` new
tokens (EOS ignored) and ``return_token_ids``, and times them: latency = request sent -> ``[DONE]``,
TTFT = request sent -> first chunk with a token. Lost / duplicated tokens are counted against an offline
engine run of the same requests in this process (a request's tokens do not depend on its batch).
Writes ``bench/results/server_load_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import add_model_args, load, load_models, machine, prompts  # noqa: E402

from s2d_ext.engine import Engine, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client, url: str, body: dict) -> dict:
    sent = time.perf_counter()
    first, ids, error = None, [], None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                new = chunk["choices"][0].get("token_ids", [])
                if new and first is None:
                    first = time.perf_counter()
                ids += new
    except Exception as exc:  # noqa: BLE001 (counted as an error)
        error = f"{type(exc).__name__}: {exc}"
    done = time.perf_counter()
    return {"ids": ids, "ttft": (first or done) - sent, "latency": done - sent, "error": error}


async def load_test(url: str, bodies: list[dict], timeout: float) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        return await asyncio.gather(*(one(client, url, b) for b in bodies))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(parser)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=900.0, help="per request, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.random:
        raise SystemExit("server_load serves a model family (the server process loads it): drop --random")
    load_before = load()
    tokenizer, name, target, draft = load_models(args)
    texts = prompts(tokenizer, args.concurrency, draft.vocab_size, args.seed)
    bodies = [
        dict(
            prompt=p,
            max_tokens=args.max_tokens,
            temperature=0.8,
            seed=i,
            ignore_eos=True,
            return_token_ids=True,
            stream=True,
        )
        for i, p in enumerate(texts)
    ]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    command = [sys.executable, "-m", "s2d_ext", "serve", "--family", args.family, "--port", str(port)]
    command += ["--threads", str(args.threads)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{server.stderr.read()}")
            time.sleep(0.5)
        warm = dict(bodies[0], max_tokens=4)
        asyncio.run(load_test(url, [warm], args.timeout))
        start = time.perf_counter()
        results = asyncio.run(load_test(url, bodies, args.timeout))
        wall = time.perf_counter() - start
        health = httpx.get(f"{url}/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    load_after = load()
    # Offline: the same requests in one engine run, in this process.
    with torch.inference_mode():
        engine = Engine(draft, target)
        for i, b in enumerate(bodies):
            params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.8, seed=i, eos_token_id=[])
            engine.add_request(b["prompt"], params, request_id=str(i))
        offline = {str(i): [] for i in range(len(bodies))}
        while engine.has_unfinished():
            for out in engine.step():
                offline[out.request_id] += out.new_token_ids
    errors = [r["error"] for r in results if r.get("error")]
    lost = dup = changed = 0
    for i, r in enumerate(results):
        want, got = offline[str(i)], r.get("ids", [])
        lost += max(0, len(want) - len(got))
        dup += max(0, len(got) - len(want))
        changed += sum(a != b for a, b in zip(got, want))
    latency = [r["latency"] for r in results if not r.get("error")]
    ttft = [r["ttft"] for r in results if not r.get("error")]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    report = {
        "machine": machine(args.threads) + " (server process; the client shares the cores)",
        "load_before": load_before,
        "load_after": load_after,
        "model": name,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "errors": len(errors),
        "error_examples": errors[:3],
        "lost_tokens": lost,
        "duplicated_tokens": dup,
        "changed_tokens": changed,
        "wall_s": wall,
        "tokens_per_s": sum(len(r.get("ids", [])) for r in results) / wall,
        "latency_p50_s": statistics.median(latency) if latency else None,
        "latency_p99_s": q(latency, 99) if latency else None,
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": q(ttft, 99) if ttft else None,
        "server_health_after": health,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "server_load_cpu"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Server load: concurrent streaming requests on loopback",
        "",
        f"Machine: {report['machine']}. Before: {load_before}; after: {load_after}.",
        f"Model: {name} with its sorted draft, served by `s2d serve --family {args.family}` in its own "
        f"process. {args.concurrency} streaming /v1/completions requests sent at once, {args.max_tokens} new "
        "tokens each (EOS ignored), temperature 0.8, one seed each.",
        "",
        "| requests | errors | lost | duplicated | changed | wall s | tokens/s | latency p50 / p99 s | "
        "TTFT p50 / p99 s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.concurrency} | {len(errors)} | {lost} | {dup} | {changed} | {wall:.1f} | "
        f"{report['tokens_per_s']:.1f} | {report['latency_p50_s']:.2f} / {report['latency_p99_s']:.2f} | "
        f"{report['ttft_p50_s']:.2f} / {report['ttft_p99_s']:.2f} |",
        "",
        "Lost / duplicated / changed: against the same requests run offline through one engine.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
