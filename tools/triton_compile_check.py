"""Ahead-of-time compile every launched Triton kernel of the package for sm_90 and sm_80 (no GPU needed).

    python tools/triton_compile_check.py              # every case, both architectures
    python tools/triton_compile_check.py --arch 90    # one architecture
    python tools/triton_compile_check.py -k verify    # only kernels whose "module.kernel" contains "verify"

CI runs the Triton kernels through the interpreter (``TRITON_INTERPRET=1``, CPU), which accepts code
that compiled Triton rejects (a plain Python float global inside ``@triton.jit``, for one). This
script runs the real compiler (``triton.compile`` on an ``ASTSource``, down to PTX and a cubin via the
ptxas bundled with Triton) for ``GPUTarget("cuda", 90 | 80, 32)``. It needs neither a GPU nor the
CUDA driver. One line per kernel / combination / architecture; exit status 1 on any failure (a
compile error, a kernel whose arguments no longer match its table below, or a kernel needing more
shared memory than the architecture has), 0 otherwise, and 0 with a message where Triton (or its
NVIDIA backend) is not installed.

What is compiled: the kernels that
``s2d_ext/triton/{verify,exit_head,exit_sample,kv_compact,invariant_linear}.py`` launch, with the
argument dtypes, constexpr values and ``num_warps`` their launchers pass on a CUDA device (not the
interpreter's smaller tiles). ``s2d_ext/triton/philox.py`` launches nothing; its
``@triton.jit`` helpers are compiled inside the verify and exit_sample kernels. The combinations (one
table per kernel, below):

- verify ``_position_stats_kernel``: logits fp32/bf16/fp16 x HAS_MIN_LOGIT, BLOCK_V=2048, 8 warps.
- verify ``_race_kernel``: logits fp32/bf16/fp16 x HAS_Q x HAS_MIN_LOGIT, BLOCK_V=2048, 8 warps.
- verify ``_finish_kernel``: the same 12 with BLOCK_C=64 (the most chunks), BLOCK_K=8 (K=7), 1 warp,
  plus the extremes BLOCK_C=1 / BLOCK_K=1 (K=0) and BLOCK_C=2 / BLOCK_K=16 on fp32 only.
- exit_head ``_rms_norm_kernel``: hidden fp32/bf16/fp16 (IS_BF16 follows) with BLOCK_D=1024 (d >= 1024),
  plus BLOCK_D=64 (a small test model) on bf16.
- exit_head ``_head_partial_kernel``: hidden fp32 (DOT_F32) / bf16 / fp16 x BLOCK_N 16 (N <= 16) or 32,
  with the large-vocabulary tiles CHUNK=512, BLOCK_V=64, BLOCK_D=64, plus the smallest tiles a tiny model
  gets (CHUNK=64, BLOCK_D=16) on fp32 and bf16.
- exit_head ``_merge_kernel``: BLOCK_N=64 (its only value).
- exit_sample ``_sample_kernel``: HAS_IDS x HAS_MIN_LOGIT, BLOCK=1024, RACE_TILE=16 (the CUDA launch).
- invariant_linear ``_invariant_linear_kernel``: weights fp32/bf16/fp16 x HAS_BIAS, BLOCK_T=4, BLOCK_N=32,
  BLOCK_K=64 (constants: the launcher never picks them from the shapes).
- kv_compact ``_kv_compact_kernel``: the cache as i8/i16/i32/i64 (fp8, 16-, 32-, 64-bit floats) with
  head dim 128 (BLOCK_I=32, BLOCK_D=128), plus on i16: one output slot (BLOCK_I=1), head dim 256
  (BLOCK_I=16, BLOCK_D=256) and head dim 1 (BLOCK_I=4096, BLOCK_D=1).
- every kernel once more (its first combination) with the integer arguments that a real launch can
  pass as 1 (N=1 rows, K=1, one chunk, one head, ...) turned into constexpr 1, as Triton's launcher
  specialises them.

Pointers carry the 16-byte divisibility hint (what fresh or ``.contiguous()`` torch tensors get); the
other integers are compiled unhinted (the general case). Not the full product of every block size
the launchers can pick: block sizes only change tile shapes, the table covers the largest and the
smallest ones. Triton caches compiled kernels (``~/.triton/cache``, or ``TRITON_CACHE_DIR``), so a
second run with unchanged kernels takes seconds; a cold run of all 120 variants (both architectures)
took 72 s of CPU time, single-threaded (Triton 3.9).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import os
import re
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

# NOTE: before anything imports triton: with TRITON_INTERPRET=1, @triton.jit builds interpreter
# functions that triton.compile cannot take.
os.environ.pop("TRITON_INTERPRET", None)

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "s2d_ext" / "triton"
ARCHS = (90, 80)
# Largest shared memory per block (opt-in) in bytes, as the Triton launcher checks it at launch.
MAX_SHARED_BYTES = {80: 166912, 90: 232448}
FLOATS = ("fp32", "bf16", "fp16")
BOOLS = (True, False)


def product(**axes) -> list[dict]:
    """Every combination of the axes' values: product(a=(1, 2), B=(3,)) -> [{a: 1, B: 3}, {a: 2, B: 3}]."""
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def with_q(combos: list[dict]) -> list[dict]:
    """Adds the draft_probs dtype: float32 when given (HAS_Q), else the logits tensor passed as a dummy."""
    return [dict(c, q="fp32" if c["HAS_Q"] else c["logits"]) for c in combos]


@dataclass(frozen=True)
class KernelTable:
    """How one launcher calls one @triton.jit kernel on a CUDA device.

    ``args`` gives each runtime argument's Triton type ("*bf16" a pointer, "i32", "fp32"); a
    "{name}" in it is filled from the combination. A combination's UPPER_CASE keys are constexpr
    arguments; its lower_case keys only fill the types (e.g. logits="bf16").
    """

    module: str  # s2d_ext/triton/<module>.py
    kernel: str  # the @triton.jit function launched
    args: dict[str, str]
    combos: list[dict]
    num_warps: int = 4
    may_be_one: tuple[str, ...] = ()  # int arguments a real launch can pass as 1
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"{self.module}.{self.kernel}")


VERIFY_ROW_ARGS = {  # the arguments the three verify kernels share
    "logits_ptr": "*{logits}",
    "tokens_ptr": "*i64",
    "temperature_ptr": "*fp32",
    "min_logit_ptr": "*fp32",  # the temperature tensor as a dummy without HAS_MIN_LOGIT
    "num_draft_ptr": "*i64",
    "stats_ptr": "*fp32",
    "argmax_ptr": "*i32",
    "vocab": "i32",
    "num_spec": "i32",
}
VERIFY_RACE_ARGS = {
    **VERIFY_ROW_ARGS,
    "draft_probs_ptr": "*{q}",
    "seeds_ptr": "*i64",
    "offsets_ptr": "*i64",
    "partial_key_ptr": "*fp32",
    "partial_block_ptr": "*i32",
    "partial_live_ptr": "*i32",
}

TABLES = [
    KernelTable(
        module="verify",
        kernel="_position_stats_kernel",
        args=VERIFY_ROW_ARGS,
        combos=product(logits=FLOATS, HAS_MIN_LOGIT=BOOLS, BLOCK_V=(2048,)),
        num_warps=8,
        may_be_one=("num_spec", "vocab"),
    ),
    KernelTable(
        module="verify",
        kernel="_race_kernel",
        args={**VERIFY_RACE_ARGS, "chunk_size": "i32"},
        combos=with_q(product(logits=FLOATS, HAS_Q=BOOLS, HAS_MIN_LOGIT=BOOLS, BLOCK_V=(2048,))),
        num_warps=8,
        may_be_one=("num_spec",),
    ),
    KernelTable(
        module="verify",
        kernel="_finish_kernel",
        args={
            **VERIFY_RACE_ARGS,
            "out_tokens_ptr": "*i64",
            "num_accepted_ptr": "*i32",
            "num_chunks": "i32",
        },
        combos=with_q(
            product(logits=FLOATS, HAS_Q=BOOLS, HAS_MIN_LOGIT=BOOLS, BLOCK_C=(64,), BLOCK_K=(8,))
            + product(logits=("fp32",), HAS_Q=BOOLS, HAS_MIN_LOGIT=(True,), BLOCK_C=(1,), BLOCK_K=(1,))
            + product(logits=("fp32",), HAS_Q=BOOLS, HAS_MIN_LOGIT=(False,), BLOCK_C=(2,), BLOCK_K=(16,))
        ),
        num_warps=1,
        may_be_one=("num_spec", "num_chunks"),
    ),
    KernelTable(
        module="exit_head",
        kernel="_rms_norm_kernel",
        args={"hidden_ptr": "*{hidden}", "weight_ptr": "*{hidden}", "normed_ptr": "*{hidden}"}
        | {"dim": "i32", "eps": "fp32"},
        combos=[dict(c, IS_BF16=c["hidden"] == "bf16") for c in product(hidden=FLOATS, BLOCK_D=(1024,))]
        + [dict(hidden="bf16", BLOCK_D=64, IS_BF16=True)],
    ),
    KernelTable(
        module="exit_head",
        kernel="_head_partial_kernel",
        args={"normed_ptr": "*{hidden}", "weight_ptr": "*{hidden}", "temperature_ptr": "*fp32"}
        | {"part_max_ptr": "*fp32", "part_arg_ptr": "*i32", "part_sum_ptr": "*fp32"}
        | {"rows": "i32", "dim": "i32", "vocab": "i32"},
        combos=[
            dict(c, DOT_F32=c["hidden"] == "fp32")
            for c in product(hidden=FLOATS, CHUNK=(512,), BLOCK_N=(16, 32), BLOCK_V=(64,), BLOCK_D=(64,))
            + product(hidden=("fp32", "bf16"), CHUNK=(64,), BLOCK_N=(16,), BLOCK_V=(64,), BLOCK_D=(16,))
        ],
        may_be_one=("rows",),
    ),
    KernelTable(
        module="exit_head",
        kernel="_merge_kernel",
        args={"part_max_ptr": "*fp32", "part_arg_ptr": "*i32", "part_sum_ptr": "*fp32"}
        | {"temperature_ptr": "*fp32", "tokens_ptr": "*i64", "confidence_ptr": "*fp32", "lse_ptr": "*fp32"}
        | {"rows": "i32", "num_chunks": "i32", "inv_vocab": "fp32", "log_vocab": "fp32"},
        combos=[dict(BLOCK_N=64)],
        may_be_one=("rows", "num_chunks"),
    ),
    KernelTable(
        module="exit_sample",
        kernel="_sample_kernel",
        args={"logits_ptr": "*fp32", "vocab_ids_ptr": "*i64", "temperature_ptr": "*fp32"}
        | {"min_logit_ptr": "*fp32", "threshold_ptr": "*fp32", "seeds_ptr": "*i64", "offsets_ptr": "*i64"}
        | {"positions_ptr": "*i64", "probs_ptr": "*fp32", "probs_rows_ptr": "*i64", "tokens_ptr": "*i64"}
        | {"confidence_ptr": "*fp32", "fired_ptr": "*i8", "head_vocab": "i32", "vocab": "i32"}
        | {"probs_count": "i32"},
        combos=product(HAS_IDS=BOOLS, HAS_MIN_LOGIT=BOOLS, BLOCK=(1024,), RACE_TILE=(16,)),
        may_be_one=("probs_count",),
    ),
    KernelTable(
        module="invariant_linear",
        kernel="_invariant_linear_kernel",
        args={"x_ptr": "*fp32", "w_ptr": "*{weight}", "bias_ptr": "*fp32", "y_ptr": "*fp32"}
        | {"rows": "i32", "in_features": "i32", "out_features": "i32"},
        combos=product(
            weight=("fp32", "bf16", "fp16"), HAS_BIAS=BOOLS, BLOCK_T=(4,), BLOCK_N=(32,), BLOCK_K=(64,)
        ),
        may_be_one=("rows",),
    ),
    KernelTable(
        module="kv_compact",
        kernel="_kv_compact_kernel",
        args={"cache_ptr": "*{bits}", "index_ptr": "*i64", "out_ptr": "*{bits}"}
        | {"heads": "i32", "slots": "i32", "slots_out": "i32", "dim": "i32"},
        combos=product(bits=("i8", "i16", "i32", "i64"), BLOCK_I=(32,), BLOCK_D=(128,))
        + [dict(bits="i16", BLOCK_I=1, BLOCK_D=128)]
        + [dict(bits="i16", BLOCK_I=16, BLOCK_D=256)]
        + [dict(bits="i16", BLOCK_I=4096, BLOCK_D=1)],
        may_be_one=("heads", "slots_out"),
    ),
]


@dataclass(frozen=True)
class Case:
    table: KernelTable
    combo: dict
    arch: int
    ones: tuple[str, ...] = ()  # int arguments specialised to constexpr 1

    def label(self) -> str:
        parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.combo.items()]
        parts += [f"{name}=1" for name in self.ones]
        return f"sm_{self.arch}  {self.table.name:36s} {' '.join(parts)} warps={self.table.num_warps}"


def cases(archs: tuple[int, ...], pattern: str) -> list[Case]:
    found = []
    for arch in archs:
        for table in TABLES:
            if pattern not in table.name:
                continue
            found += [Case(table, combo, arch) for combo in table.combos]
            if table.may_be_one:
                found.append(Case(table, table.combos[0], arch, table.may_be_one))
    return found


def load_kernel_modules() -> dict[str, types.ModuleType]:
    """Imports every s2d_ext/triton/<module>.py, without running s2d_ext/__init__.py.

    NOTE: bare package objects stand in for s2d_ext and s2d_ext.triton: the kernels need only torch
    and triton, while the package's __init__ imports transformers (slow) and loads the native
    libraries (which a concurrent build may be rewriting).
    """
    for name, path in (("s2d_ext", ROOT / "s2d_ext"), ("s2d_ext.triton", KERNEL_DIR)):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    names = sorted(path.stem for path in KERNEL_DIR.glob("*.py") if path.stem != "__init__")
    return {name: importlib.import_module(f"s2d_ext.triton.{name}") for name in names}


def launched_without_table(modules: dict[str, types.ModuleType]) -> list[str]:
    """The "module.kernel" names of @triton.jit functions launched (``kernel[grid](...)``) in their
    own module but missing from TABLES: a new kernel must get a table here."""
    from triton.runtime.jit import JITFunction

    tabled = {table.name for table in TABLES}
    missing = []
    for module_name, module in modules.items():
        source = Path(module.__file__).read_text()
        for name, value in vars(module).items():
            defined_here = isinstance(value, JITFunction) and value.fn.__module__ == module.__name__
            launched = re.search(rf"\b{re.escape(name)}\[", source) is not None
            if defined_here and launched and f"{module_name}.{name}" not in tabled:
                missing.append(f"{module_name}.{name}")
    return missing


def compile_case(case: Case, modules: dict[str, types.ModuleType]) -> str:
    """Compiles one case; returns a short summary, raises on any failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    table = case.table
    fn = getattr(modules[table.module], table.kernel)
    constexprs = {k: v for k, v in case.combo.items() if k[:1].isupper()}
    constexprs |= dict.fromkeys(case.ones, 1)
    types_of = {k: v.format(**case.combo) for k, v in table.args.items() if k not in case.ones}
    missing = set(fn.arg_names) - set(types_of) - set(constexprs)
    unknown = (set(types_of) | set(constexprs)) - set(fn.arg_names)
    if missing or unknown:
        raise LookupError(
            f"the table of {table.name} is out of date (kernel arguments not in it: {sorted(missing)}; "
            f"table entries the kernel lacks: {sorted(unknown)}); update tools/triton_compile_check.py"
        )
    signature = {name: "constexpr" if name in constexprs else types_of[name] for name in fn.arg_names}
    # NOTE: the divisibility-16 hint Triton's launcher gives pointers to 16-byte aligned tensors.
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(fn.arg_names)
        if signature[name].startswith("*")
    }
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", case.arch, 32), options={"num_warps": table.num_warps}
    )
    shared = compiled.metadata.shared
    if shared > MAX_SHARED_BYTES[case.arch]:
        raise RuntimeError(
            f"needs {shared} bytes of shared memory, sm_{case.arch} has {MAX_SHARED_BYTES[case.arch]}"
        )
    return f"shared={shared}B"


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=ARCHS, default=list(ARCHS))
    parser.add_argument("-k", dest="pattern", default="", help="only kernels whose module.kernel has this")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("triton") is None:
        print("triton is not installed: Triton compile check skipped")
        return 0
    import triton
    from triton.backends import backends

    if "nvidia" not in backends:
        print(f"triton {triton.__version__} has no NVIDIA backend: Triton compile check skipped")
        return 0

    # NOTE: Triton 3.9 warns that its fp-fusion default will change; the launchers use the default too.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    modules = load_kernel_modules()
    untabled = launched_without_table(modules)
    todo = cases(tuple(args.arch), args.pattern)
    if not todo:
        print(f"no kernel matches -k {args.pattern!r}")
        return 2
    archs = " ".join(f"sm_{arch}" for arch in args.arch)
    print(f"triton {triton.__version__}: compiling {len(todo)} kernel variants for {archs}")
    for name in untabled:
        print(f"FAIL {name} is launched but has no table in tools/triton_compile_check.py (not compiled)")
    failures: list[tuple[Case, BaseException]] = []
    start = time.perf_counter()
    for case in todo:
        case_start = time.perf_counter()
        try:
            summary = compile_case(case, modules)
        except Exception as error:  # NOTE: report every failure, then go on
            failures.append((case, error))
            print(f"FAIL {case.label()}  {first_line(error)}", flush=True)
            continue
        print(f"ok   {case.label()}  {summary} {time.perf_counter() - case_start:.1f}s", flush=True)
    elapsed = time.perf_counter() - start
    for case, error in failures:
        print(f"\n=== FAIL {case.label()}\n{type(error).__name__}: {error}")
    print(f"\n{len(todo) - len(failures)}/{len(todo)} compiled in {elapsed:.0f}s; {len(failures)} failed")
    if untabled:
        print(f"{len(untabled)} launched kernel(s) without a table: {', '.join(untabled)}")
    return 1 if failures or untabled else 0


if __name__ == "__main__":
    sys.exit(main())
