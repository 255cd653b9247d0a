"""Server load: ``--concurrency`` streaming requests at once against ``s2d serve`` on loopback, one plain
server and/or Ray Serve replicas of it, or a server already running at ``--url``.

    python bench/server_load.py                                  # the bench family, one plain server
    python bench/server_load.py --servers plain,ray --replicas 2 --rounds 2 -- \\
        --target qwen-coder-0.5b --draft ~/.cache/s2d_ext/drafts/qwen-coder-0.5b-untrained --dtype bfloat16
    python bench/server_load.py --url http://127.0.0.1:8000 -- --target ... --draft ...

Everything after ``--`` is ``s2d serve``'s own arguments (default ``--family bench``; ``--threads`` is added):
the plain server is ``python -m s2d_ext serve ARGS`` in a process of its own, each Ray replica builds the same
app (:mod:`s2d_ext.integrations.ray_serve`, ``ray.init(num_cpus=os.cpu_count())`` in this process), and the
offline reference below is built by the same code (:func:`s2d_ext.cli.serve.build_engine`). With ``--url``,
ARGS must describe what that server serves.

This process sends every request at once (httpx, asyncio), each with its own seed, ``--max-tokens`` new
tokens (EOS ignored) and ``return_token_ids``, and times them: latency = request sent -> ``[DONE]``, TTFT =
request sent -> first chunk with a token. With several servers, the load tests alternate server by server,
``--rounds`` times, so a change in the host's load reaches them alike. Lost / duplicated / changed tokens
are counted against an offline engine run of the same requests in this process, all joining at once (in
bf16 a sampled token has differed when requests joined a running batch at other times: README, "Scaling
out"). Writes ``bench/results/<name>.{json,md}`` (``server_load_cpu`` for one plain server,
``server_load_plain_ray_cpu`` for ``--servers plain,ray``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from _workload import load, machine, prompts  # noqa: E402

from s2d_ext.engine import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SERVERS = ("plain", "ray")
START_S = 600  # a server loading a real model on a busy 2-core host


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


def wait_healthy(url: str, alive=lambda: True, why=lambda: "") -> None:
    import httpx

    deadline = time.monotonic() + START_S
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if not alive() or time.monotonic() > deadline:
            raise SystemExit(f"the server at {url} did not start:\n{why()}")
        time.sleep(0.5)


@contextlib.contextmanager
def plain_server(serve_args: list[str], threads: int):
    """The url of ``python -m s2d_ext serve SERVE_ARGS`` in a process of its own."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "s2d_ext", "serve", *serve_args, "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, lambda: server.poll() is None, lambda: server.stderr.read())
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def builder_args(serve_args: list[str]) -> dict:
    """``s2d serve`` flags as Ray Serve builder keys (``--target a --target b`` -> ``target=[a, b]``)."""
    out: dict = {}
    it = iter(serve_args)
    for flag in it:
        if not flag.startswith("--"):
            raise SystemExit(f"server_load: expected an s2d serve flag, got {flag!r}")
        key, value = flag[2:].replace("-", "_"), next(it, None)
        if value is None:
            raise SystemExit(f"server_load: {flag} needs a value to pass to the Ray replicas")
        out[key] = [*out[key], value] if key == "target" and key in out else value
    return out


@contextlib.contextmanager
def ray_server(serve_args: list[str], replicas: int, threads: int):
    """The url of Ray Serve's proxy over ``replicas`` replicas of ``s2d serve SERVE_ARGS`` (this process)."""
    import ray
    from ray import serve

    from s2d_ext.integrations import ray_serve

    slow_host = ray_serve.SLOW_HOST_ENV
    os.environ.update(slow_host)
    # NOTE: Ray starts its workers at nice 15 (RAY_worker_niceness): beside the plain server (nice 0) and
    # any other job on a busy host the replicas then starve (4% CPU each in a first run here, every request
    # timed out). Equal priority makes the comparison fair; read before ray.init starts the raylet.
    os.environ.setdefault("RAY_worker_niceness", "0")
    env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "0", **slow_host}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": env})  # fmt: skip
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cpus = str(max(0.1, min(threads, os.cpu_count() / replicas)))
        app = ray_serve.app_builder(
            {**builder_args(serve_args), "num_replicas": str(replicas), "num_cpus": cpus}
        )
        serve.run(app, name="s2d_load", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def quantile(xs: list[float], p: int) -> float | None:
    if not xs:
        return None
    return statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]


def summary(results: list[dict], offline: dict, wall: float) -> dict:
    """Errors, lost / duplicated / changed tokens against ``offline``, throughput and latency quantiles."""
    errors = [r["error"] for r in results if r.get("error")]
    lost = dup = changed = 0
    for i, r in enumerate(results):
        want, got = offline[str(i)], r.get("ids", [])
        lost += max(0, len(want) - len(got))
        dup += max(0, len(got) - len(want))
        changed += sum(a != b for a, b in zip(got, want))
    latency = [r["latency"] for r in results if not r.get("error")]
    ttft = [r["ttft"] for r in results if not r.get("error")]
    return {
        "errors": len(errors),
        "error_examples": errors[:3],
        "lost_tokens": lost,
        "duplicated_tokens": dup,
        "changed_tokens": changed,
        "wall_s": wall,
        "tokens_per_s": sum(len(r.get("ids", [])) for r in results) / wall,
        "latency_p50_s": statistics.median(latency) if latency else None,
        "latency_p99_s": quantile(latency, 99),
        "ttft_p50_s": statistics.median(ttft) if ttft else None,
        "ttft_p99_s": quantile(ttft, 99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", default="plain", help="comma-separated: plain, ray (plain)")
    parser.add_argument("--url", default=None, help="a server already running (instead of --servers)")
    parser.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (2)")
    parser.add_argument("--rounds", type=int, default=1, help="load tests per server, alternating (1)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-tokens", type=int, default=96, help="prompts cut to this many tokens")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process / replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="per request, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="result file stem (default from --servers)")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then s2d serve's arguments")
    args = parser.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"] or ["--family", "bench"]
    serve_args += ["--threads", str(args.threads)]
    servers = ["url"] if args.url else [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = [s for s in servers if s not in (*SERVERS, "url")]
    if unknown or not servers:
        raise SystemExit(f"--servers takes a comma-separated list of {SERVERS}, got {args.servers!r}")

    from s2d_ext.cli import build_parser
    from s2d_ext.cli.serve import build_engine

    load_before = load()
    # NOTE: the offline reference is built by s2d serve's own code from the same arguments.
    engine, tokenizer, line = build_engine(build_parser().parse_args(["serve", *serve_args]))
    texts = prompts(tokenizer, args.concurrency, engine.vocab_size, args.seed, args.max_prompt_tokens)
    bodies = [
        dict(prompt=p, max_tokens=args.max_tokens, temperature=0.8, seed=i, ignore_eos=True,
             return_token_ids=True, stream=True)
        for i, p in enumerate(texts)
    ]  # fmt: skip
    runs: list[dict] = []
    with contextlib.ExitStack() as stack:
        urls = {}
        for name in servers:
            if name == "url":
                urls[name] = args.url.rstrip("/")
            elif name == "plain":
                urls[name] = stack.enter_context(plain_server(serve_args, args.threads))
            else:
                urls[name] = stack.enter_context(ray_server(serve_args, args.replicas, args.threads))
        for url in urls.values():  # NOTE: warm-up (kernels, first allocations)
            asyncio.run(load_test(url, [dict(bodies[0], max_tokens=4)], args.timeout))
        for r in range(args.rounds):
            for name in servers if r % 2 == 0 else servers[::-1]:
                start = time.perf_counter()
                results = asyncio.run(load_test(urls[name], bodies, args.timeout))
                runs.append(
                    {"server": name, "round": r, "results": results, "wall": time.perf_counter() - start}
                )
                print(f"round {r} {name}: {runs[-1]['wall']:.1f} s", flush=True)
    load_after = load()
    # Offline: the same requests in one engine run, in this process.
    torch.set_num_threads(args.threads)
    with torch.inference_mode():
        for i, b in enumerate(bodies):
            params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.8, seed=i, eos_token_id=[])
            engine.add_request(b["prompt"], params, request_id=str(i))
        offline = {str(i): [] for i in range(len(bodies))}
        while engine.has_unfinished():
            for out in engine.step():
                offline[out.request_id] += out.new_token_ids
    rows = [{"server": run["server"], "round": run["round"], **summary(run["results"], offline, run["wall"])}
            for run in runs]  # fmt: skip
    labels = {
        "plain": f"one plain `s2d serve` ({args.threads} thread)",
        "ray": f"Ray Serve, {args.replicas} replicas ({args.threads} thread each)",
        "url": f"the server at {args.url}",
    }
    report = {
        "machine": machine(args.threads) + " (each server process / replica; the client shares the cores)",
        "load_before": load_before,
        "load_after": load_after,
        "serve_args": serve_args,
        "serves": line,
        "servers": {s: labels[s] for s in servers},
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "max_prompt_tokens": args.max_prompt_tokens,
        "rounds": rows,
    }
    name = args.name or (
        "server_load_cpu" if servers == ["plain"] else f"server_load_{'_'.join(servers)}_cpu"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / name
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    lines = [
        "# Server load: concurrent streaming requests on loopback",
        "",
        f"Machine: {report['machine']}. Before: {load_before}; after: {load_after}.",
        f"Served: `s2d serve {' '.join(serve_args)}` ({line.split(' on http')[0]}). {args.concurrency} "
        f"streaming /v1/completions requests sent at once (prompts of at most {args.max_prompt_tokens} "
        f"tokens), {args.max_tokens} new tokens each (EOS ignored), temperature 0.8, one seed each; "
        f"{args.rounds} round(s), the servers alternating.",
        "",
        "| server | round | errors | lost | duplicated | changed | wall s | tokens/s | latency p50 / p99 s "
        "| TTFT p50 / p99 s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {labels[row['server']]} | {row['round']} | {row['errors']} | {row['lost_tokens']} | "
            f"{row['duplicated_tokens']} | {row['changed_tokens']} | {row['wall_s']:.1f} | "
            f"{row['tokens_per_s']:.1f} | {f(row['latency_p50_s'])} / {f(row['latency_p99_s'])} | "
            f"{f(row['ttft_p50_s'])} / {f(row['ttft_p99_s'])} |"
        )
    lines += ["", "Lost / duplicated / changed: against the same requests run offline through one engine."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
