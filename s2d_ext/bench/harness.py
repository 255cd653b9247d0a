"""The Spec-Bench run end to end (``s2d bench``, ``python -m s2d_ext.bench.harness``): every method
(:mod:`s2d_ext.bench.spec_bench`), the threshold x draft-length grid with ``--ablation``
(:mod:`s2d_ext.bench.ablation`), and the reports (:mod:`s2d_ext.bench.spec_bench_report`).

NOTE: its own module, above both spec_bench and ablation (which runs spec_bench's methods), so the two do not
import each other.
"""

from __future__ import annotations

import argparse

from s2d_ext.bench import spec_bench
from s2d_ext.bench.ablation import run_ablation
from s2d_ext.bench.arguments import add_arguments


def main(argv: list[str] | None = None) -> None:
    from s2d_ext.bench.spec_bench_report import write_reports

    parser = argparse.ArgumentParser(
        description=spec_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_and_report(args, write_reports)


def run_and_report(args, write_reports) -> None:
    result = spec_bench.run(args)
    if args.ablation:
        result["ablation"] = run_ablation(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or ("spec_bench_gpu" if "gpu" in result["machine"] else "spec_bench_cpu")
    paths = write_reports(result, args.out, stem)
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
