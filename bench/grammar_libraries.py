"""Which grammar library the server uses for structured output, chosen by measurement.

For xgrammar, llguidance and outlines-core (each installed from its CPU wheel), on one or more real HF
tokenizers (folders with ``tokenizer.json``; e.g. SmolLM2's 49,152 ids and Qwen2.5-Coder's 151,936): the
one-time tokenizer set-up, the compile time of a JSON schema (cold: caches off; llguidance compiles lazily,
so its construction + first mask count as its compile), and per generated token the time to compute the
allowed-token mask and to advance by the token, walking the tokens of a valid document. Then ``{"type":
"object"}`` (``response_format: json_object``) the same way where the library can express it. The
libraries run interleaved (round-robin, ``--rounds`` times); medians are reported.
Writes ``bench/results/grammar_libraries_cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _workload import load, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
        },
        "role": {"enum": ["admin", "user", "guest"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "role", "active"],
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["math", "engines"],
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "role": "admin",
    "active": True,
}


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        self.vocab = vocab

    def compile(self, schema: dict):
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return self.xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema)))

    def walk(self, matcher, tokens) -> tuple[list[float], list[float]]:
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab)
        masks, advances = [], []
        for t in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            middle = time.perf_counter()
            ok = matcher.accept_token(t)
            masks.append(middle - start)
            advances.append(time.perf_counter() - middle)
            assert ok, f"xgrammar refused token {t}"
        return masks, advances


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, vocab)
        self.vocab = vocab

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        matcher = self.llg.LLMatcher(self.tok, grammar)
        bitmask = self.llg.torch.allocate_token_bitmask(1, self.tok.vocab_size)
        self.llg.torch.fill_next_token_bitmask(matcher, bitmask, 0)  # NOTE: lazy: the first mask compiles
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def walk(self, matcher, tokens):
        bitmask = self.llg.torch.allocate_token_bitmask(1, self.tok.vocab_size)
        masks, advances = [], []
        for t in tokens:
            start = time.perf_counter()
            self.llg.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            middle = time.perf_counter()
            ok = matcher.consume_token(t)
            masks.append(middle - start)
            advances.append(time.perf_counter() - middle)
            assert ok, f"llguidance refused token {t}: {matcher.get_error()}"
        return masks, advances


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab: int) -> None:
        import outlines_core

        self.oc = outlines_core
        # NOTE: Vocabulary.from_pretrained downloads from the hub; built from the local tokenizer instead,
        # each token as its bytes (byte-level BPE stores them in GPT-2's bytes-to-unicode alphabet).
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        eos = tokenizer.eos_token_id
        mapping: dict[bytes, list[int]] = {}
        for token, i in tokenizer.get_vocab().items():
            if i != eos and i not in tokenizer.all_special_ids:
                raw = bytes(to_byte[c] for c in token) if all(c in to_byte for c in token) else token.encode()
                mapping.setdefault(raw, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, mapping)
        self.vocab = vocab

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def walk(self, guide, tokens):
        bitmask = torch.zeros((1, (self.vocab + 31) // 32), dtype=torch.int32)
        masks, advances = [], []
        for t in tokens:
            start = time.perf_counter()
            guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4)
            middle = time.perf_counter()
            if t == self.vocabulary.get_eos_token_id():
                assert guide.is_finished()  # NOTE: outlines-core ends on a final state, not on EOS
            else:
                guide.advance(t, return_tokens=False)
            masks.append(middle - start)
            advances.append(time.perf_counter() - middle)
        return masks, advances


LIBRARIES = {"xgrammar": Xgrammar, "llguidance": Llguidance, "outlines-core": OutlinesCore}

#: Schemas a server must refuse (invalid, or matching nothing): does a library say so when compiling?
BAD_SCHEMAS = {
    "unknown type": {"type": "banana"},
    "dangling $ref": {"$ref": "#/$defs/missing"},
    "minimum > maximum": {"type": "integer", "minimum": 5, "maximum": 1},
    "allOf string and integer": {"allOf": [{"type": "string"}, {"type": "integer"}]},
    "string enum of numbers": {"type": "string", "enum": [1, 2]},
    "false": False,
}


def compile_errors(tokenizer_dir: str, names: list[str]) -> dict:
    """{library: {case: error message or "compiled"}} for :data:`BAD_SCHEMAS`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    vocab = max(len(tokenizer), int(config["vocab_size"]))
    out = {}
    for name in names:
        lib = LIBRARIES[name](tokenizer, vocab)
        out[name] = {}
        for case, schema in BAD_SCHEMAS.items():
            try:
                matcher = lib.compile(schema)
                error = matcher.get_error() if hasattr(matcher, "get_error") else ""
                out[name][case] = f"error: {error}" if error else "compiled"
            except Exception as exc:  # noqa: BLE001 (each library raises its own)
                out[name][case] = f"error: {str(exc).splitlines()[0][:120]}"
    return out


PACKAGES = {"xgrammar": "xgrammar", "llguidance": "llguidance", "outlines-core": "outlines_core"}


def measure(tokenizer_dir: str, names: list[str], rounds: int) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    vocab = max(len(tokenizer), int(config["vocab_size"]))
    doc_tokens = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False) + [tokenizer.eos_token_id]
    result = {"tokenizer": tokenizer_dir, "vocab": vocab, "document_tokens": len(doc_tokens), "libraries": {}}
    libs = {}
    for name in names:
        start = time.perf_counter()
        libs[name] = LIBRARIES[name](tokenizer, vocab)
        result["libraries"][name] = {
            "version": importlib.metadata.version(PACKAGES[name]),
            "tokenizer_setup_s": time.perf_counter() - start,
            "compile_s": [],
            "mask_us": [],
            "advance_us": [],
            "json_object_compile_s": [],
            "json_object_mask_us": [],
        }
    for _ in range(rounds):
        for name, lib in libs.items():  # NOTE: interleaved, so a drifting load reaches each library alike
            row = result["libraries"][name]
            start = time.perf_counter()
            matcher = lib.compile(SCHEMA)
            row["compile_s"].append(time.perf_counter() - start)
            masks, advances = lib.walk(matcher, doc_tokens)
            row["mask_us"] += [1e6 * m for m in masks]
            row["advance_us"] += [1e6 * a for a in advances]
            if name == "outlines-core":
                continue  # NOTE: a regex cannot express JSON of unbounded nesting: no json_object
            start = time.perf_counter()
            matcher = lib.compile({"type": "object"})
            row["json_object_compile_s"].append(time.perf_counter() - start)
            masks, _ = lib.walk(matcher, doc_tokens)
            row["json_object_mask_us"] += [1e6 * m for m in masks]
    for row in result["libraries"].values():
        for key in ("compile_s", "mask_us", "advance_us", "json_object_compile_s", "json_object_mask_us"):
            values = row.pop(key)
            row[f"{key}_median"] = statistics.median(values) if values else None
            if key.endswith("_us") and values:
                row[f"{key}_p90"] = sorted(values)[int(0.9 * (len(values) - 1))]
    return result


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Grammar libraries for structured output (CPU)",
        "",
        f"Machine: {meta['machine']}; {meta['load_start']} at the start, {meta['load_end']} at the end.",
        f"Schema: {len(SCHEMA['properties'])} properties (nested object, integer range, email format, enum,",
        "array, pattern); document: a valid instance as `json.dumps` writes it, tokenized by the tokenizer,",
        f"then EOS. {meta['rounds']} rounds, libraries interleaved; medians (p90 of the per-token times).",
        "One thread each: xgrammar's compiler with max_threads=1, llguidance under RAYON_NUM_THREADS="
        f"{os.environ.get('RAYON_NUM_THREADS', 'unset')}.",
        "",
    ]
    for r in results:
        lines += [
            f"## `{r['tokenizer']}`: {r['vocab']} ids, document {r['document_tokens']} tokens",
            "",
            "| library | version | tokenizer set-up (s, once) | schema compile (s) | mask / token (us) "
            "| advance / token (us) | json_object compile (s) | json_object mask / token (us) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in r["libraries"].items():
            obj = row["json_object_compile_s_median"]
            lines.append(
                f"| {name} | {row['version']} | {row['tokenizer_setup_s']:.2f} "
                f"| {row['compile_s_median']:.3f} "
                f"| {row['mask_us_median']:.0f} (p90 {row['mask_us_p90']:.0f}) "
                f"| {row['advance_us_median']:.0f} | "
                + ("not expressible (regex) | - |" if obj is None else f"{obj:.3f} | ")
                + ("" if obj is None else f"{row['json_object_mask_us_median']:.0f} |")
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tokenizers", nargs="+", help="HF tokenizer folders (config.json gives vocab_size)")
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--errors", action="store_true", help="only which bad schemas each library refuses")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.errors:
        found = compile_errors(args.tokenizers[0], args.libraries)
        lines = ["# Bad JSON schemas: refused when compiled?", "", f"Tokenizer `{args.tokenizers[0]}`.", ""]
        lines += ["| schema | " + " | ".join(found) + " |", "|---|" + "---|" * len(found)]
        for case in BAD_SCHEMAS:
            lines.append(f"| {case} | " + " | ".join(found[n][case].replace("|", "/") for n in found) + " |")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "grammar_library_errors_cpu.json").write_text(json.dumps(found, indent=2))
        (args.out / "grammar_library_errors_cpu.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    meta = {"machine": machine(args.threads), "load_start": load(), "rounds": args.rounds}
    results = [measure(t, args.libraries, args.rounds) for t in args.tokenizers]
    meta["load_end"] = load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grammar_libraries_cpu.json").write_text(json.dumps({**meta, "results": results}, indent=2))
    text = markdown(results, meta)
    (args.out / "grammar_libraries_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
