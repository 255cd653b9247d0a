"""A long schemathesis run over the server's OpenAPI schema: ``python_tests/server/test_fuzz.py`` with
``--examples`` examples per operation and mode (valid and invalid bodies), its status counts written to
``bench/results/server_fuzz_cpu.{json,md}``. The test fails on any 5xx or a 4xx without a JSON error body.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import load, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / "server_fuzz_cpu.json"
    env = {**os.environ, "S2D_FUZZ_EXAMPLES": str(args.examples), "S2D_FUZZ_REPORT": str(report)}
    env.setdefault("OMP_NUM_THREADS", "1")
    meta = {"machine": machine(1), "load_start": load()}
    start = time.perf_counter()
    test = "python_tests/server/test_fuzz.py"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", test], cwd=ROOT, env=env, check=False)
    seconds = time.perf_counter() - start
    data = json.loads(report.read_text())
    data.update(meta, load_end=load(), seconds=seconds, pytest_exit_code=run.returncode)
    report.write_text(json.dumps(data, indent=2))
    totals: collections.Counter = collections.Counter()
    for row in data["statuses"]:
        totals[(row["method"], row["path"], row["mode"], row["status"])] += row["count"]
    server_errors = sum(n for (_, _, _, s), n in totals.items() if s >= 500)
    lines = [
        "# schemathesis over the server's OpenAPI schema (CPU)",
        "",
        f"Machine: {meta['machine']}; {meta['load_start']} at the start, {data['load_end']} at the end.",
        f"`python_tests/server/test_fuzz.py` with {args.examples} examples per operation and generation mode "
        f"(positive: bodies valid under the schema; negative: invalid ones), in {seconds:.0f} s; "
        f"pytest exit code {run.returncode}. Server errors (5xx): **{server_errors}**; 4xx answers without a "
        f"JSON error body: **{len(data['problems'])}**.",
        "",
        "| operation | mode | status | count |",
        "|---|---|---|---|",
        *[f"| {m} {p} | {g} | {s} | {n} |" for (m, p, g, s), n in sorted(totals.items())],
        "",
    ]
    (args.out / "server_fuzz_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
