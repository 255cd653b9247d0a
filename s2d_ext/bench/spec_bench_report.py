"""Turns the records of ``s2d_ext.bench.spec_bench`` into JSON, a markdown table and PNG plots.

Speedups divide a method's tokens/s by plain ``generate``'s tokens/s for the same target, setting and
category, all taken in the same run. At batch 1 every record is one prompt, so results are given per
Spec-Bench category; larger batches mix categories and are reported overall only.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

OVERALL = "overall"


def draft_cost(rec: dict, cost_model: dict | None) -> tuple[float, float] | None:
    """(layer passes, head evaluations) the draft spent per drafted token, from the record's exit histogram.

    A token that exits at ``e_j`` (the j-th of the method's exits) ran ``e_j`` layers and ``j`` exit heads.
    NOTE: a lower bound for S2D: the layers an early exit skipped still run later for that token's KV cache
    (deferred fill), which this count leaves out.
    """
    hist = rec.get("exit_histogram") or {}
    exits = rec.get("draft_exits")
    if not hist or not exits or cost_model is None:
        return None
    layers = heads = 0.0
    for layer, count in hist.items():
        layer = int(layer)
        layers += count * layer
        heads += count * (exits.index(layer) + 1 if layer in exits else len(exits))
    return layers, heads


def aggregate(records: list[dict], cost_model: dict | None = None) -> dict:
    """{(target, temperature, batch, method): {category: metrics}} with tokens/s, MAT, acceptance, ...

    With a ``cost_model`` ({"target_layers": L, "target_head_layers": H, "draft_head_layers": h}: LM heads'
    weights in units of one decoder layer's) each drafting method also gets ``draft_cost``, its draft's work
    per target forward in target forwards (``(layer passes + h * head evaluations) / steps / (L + H)``, from
    the exit histogram), and ``mat_per_cost``.
    Acceptance by position is each run's P(draft j accepted | proposed) weighted by its target forwards.
    """
    sums: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(float)))
    exits: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    by_position: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: [0.0, 0.0])))
    peaks: dict = defaultdict(float)
    for rec in records:
        key = (rec["target"], rec["temperature"], rec["batch_size"], rec["method"])
        categories = [OVERALL]
        if rec["batch_size"] == 1:
            categories.append(rec["categories"][0])
        for category in categories:
            bucket = sums[key][category]
            for field in ("new_tokens", "seconds", "steps", "drafted", "accepted"):
                bucket[field] += rec.get(field, 0) or 0
            for part, seconds in (rec.get("time_split") or {}).items():
                bucket[f"time_{part}"] += seconds
            for layer, count in (rec.get("exit_histogram") or {}).items():
                exits[key][category][int(layer)] += count
            cost = draft_cost(rec, cost_model)
            if cost is not None:
                bucket["draft_layers"] += cost[0]
                bucket["draft_heads"] += cost[1]
            for j, p in enumerate(rec.get("acceptance_by_position") or ()):
                cell = by_position[key][category][j]
                cell[0] += p * (rec.get("steps") or 0)
                cell[1] += rec.get("steps") or 0
        if rec.get("peak_memory_mib"):
            peaks[key] = max(peaks[key], rec["peak_memory_mib"])
    table: dict = {}
    for key, by_category in sums.items():
        table[key] = {}
        for category, s in by_category.items():
            split_total = sum(s[f"time_{p}"] for p in ("draft", "target", "verify", "other"))
            table[key][category] = dict(
                new_tokens=int(s["new_tokens"]),
                seconds=s["seconds"],
                tokens_per_s=s["new_tokens"] / s["seconds"] if s["seconds"] else 0.0,
                mat=s["new_tokens"] / s["steps"] if s["steps"] else None,
                acceptance=s["accepted"] / s["drafted"] if s["drafted"] else None,
                exit_histogram=dict(sorted(exits[key][category].items())),
                time_split=(
                    {p: s[f"time_{p}"] / split_total for p in ("draft", "target", "verify", "other")}
                    if split_total
                    else None
                ),
                peak_memory_mib=peaks.get(key),
                acceptance_by_position=[
                    a / w if w else None for _, (a, w) in sorted(by_position[key][category].items())
                ],
            )
            metrics = table[key][category]
            if cost_model is not None and s["draft_layers"] and s["steps"]:
                total = cost_model["target_layers"] + cost_model["target_head_layers"]
                per_step = (s["draft_layers"] + cost_model["draft_head_layers"] * s["draft_heads"]) / s[
                    "steps"
                ]
                metrics["draft_cost"] = per_step / total
                metrics["mat_per_cost"] = metrics["mat"] / metrics["draft_cost"] if metrics["mat"] else None
    for (target, temperature, batch, _method), by_category in table.items():
        baseline = table.get((target, temperature, batch, "generate"), {})
        for category, metrics in by_category.items():
            base = baseline.get(category, {}).get("tokens_per_s")
            metrics["speedup"] = metrics["tokens_per_s"] / base if base else None
    return table


def greedy_matches(records: list[dict]) -> dict:
    """Fraction of greedy rows whose tokens equal generate's on the same kernels (a lossless check): methods
    on s2d's row-invariant kernels against ``generate-invariant`` when the run has it, the others against
    ``generate``."""
    counts: dict = defaultdict(lambda: [0, 0])
    by_setting = defaultdict(list)
    for rec in records:
        if rec["temperature"] == 0:
            by_setting[(rec["target"], rec["batch_size"], rec["method"])].append(rec)
    for (target, batch, method), recs in by_setting.items():
        if method.startswith("generate"):
            continue  # NOTE: the baselines themselves (generate-fp32 is another dtype, not a lossless method)
        reference = "generate"
        if recs[0].get("kernels") == "invariant" and (target, batch, "generate-invariant") in by_setting:
            reference = "generate-invariant"
        base = by_setting.get((target, batch, reference), [])
        for rec, ref in zip(recs, base):
            for mine, theirs in zip(rec["sequences"], ref["sequences"]):
                counts[(target, batch, method)][0] += int(mine == theirs)
                counts[(target, batch, method)][1] += 1
    return {f"{t} B={b} {m}": (ok / n if n else None) for (t, b, m), (ok, n) in counts.items()}


def _loads(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _fmt(value, digits=2, suffix="") -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{suffix}"


def _run_lines(result: dict) -> list[str]:
    """The run's dtype / kernels line and, for HumanEval, the problems evaluated."""
    lines = []
    line = (result.get("run_settings") or {}).get("line")
    if line:
        lines += [f"Run: {line}.", ""]
    if result.get("workload") == "humaneval":
        lines += [
            f"Workload: HumanEval problems {', '.join(result['problems'])} as raw code completion; pass@1 "
            "from each problem's tests (round 0).",
            "",
        ]
    return lines


def _pass_cell(passes: dict, target: str, temperature: float, method: str) -> str:
    if not passes:
        return ""
    return f" {_fmt(passes.get(f'{target}|T={temperature:g}|{method}'), 3)} |"


def markdown(result: dict, table: dict, matches: dict) -> str:
    machine = result["machine"]
    where = f"{machine.get('gpu') or machine.get('cpu')} ({machine['device']}, {machine['threads']} threads)"
    lines = [
        "# Spec-Bench results",
        "",
        f"Machine: {where},",
        f"torch {machine['torch']}, transformers {machine['transformers']}.",
        "Run: "
        + json.dumps(
            {
                k: result["args"].get(k)
                for k in (
                    "family",
                    "targets",
                    "target_names",
                    "target",
                    "draft",
                    "limit",
                    "max_new_tokens",
                    "threads",
                    "ignore_eos",
                    "rounds",
                )
                if result["args"].get(k) is not None
            }
        ),
        "The methods run interleaved, prompt by prompt "
        f"({result['args'].get('rounds', 1)} rounds, alternating order), so load drifts reach them alike.",
        "Draft vocabulary: "
        + (
            f"the {result['draft_vocab']} most frequent training tokens, for every draft method."
            if result.get("draft_vocab")
            else "none (the full vocabulary)."
        ),
        "",
        *_run_lines(result),
        "Speedup = tokens/s over plain `generate` of the same target and setting (torch's kernels), same "
        "run. "
        "`generate-invariant` is generate on s2d's row-invariant kernels, which the speculative methods, "
        "`assisted` and `pld` run on when the run's kernels are s2d's. "
        "MAT = emitted tokens per target forward. "
        "Split = draft/target/verify/other share of speculate's time.",
        "",
    ]
    load = result.get("load_average")
    if load:
        # NOTE: the warning only when it applies: a load above the core count means other jobs shared it.
        busy = max(list(load["start"]) + list(load["end"])) > load["cores"]
        verdict = (
            "above the core count, other jobs shared the CPU and tokens/s are low and noisy (MAT and "
            "acceptance are not affected)"
            if busy
            else "within the core count"
        )
        lines += [
            f"Load average (1, 5, 15 min) at the start {_loads(load['start'])}, at the end "
            f"{_loads(load['end'])} on {load['cores']} cores: {verdict}.",
            "",
        ]
    if result.get("cost_model"):
        cm = result["cost_model"]
        lines += [
            "Draft cost = the draft's layer passes plus exit heads per target forward, in target forwards "
            f"(the target: {cm['target_layers']} layers + a head worth {cm['target_head_layers']:.2f} "
            f"layers; a draft exit head is worth {cm['draft_head_layers']:.2f} layers), from the exits used; "
            "for S2D a lower bound (the deferred KV fill of skipped layers is not counted). MAT / cost "
            "compares drafts independently of the hardware.",
            "",
        ]
    settings = sorted({(t, temp, b) for (t, temp, b, _) in table})
    for target, temperature, batch in settings:
        lines += [f"## {target}, temperature {temperature:g}, batch {batch}", ""]
        passes = result.get("pass_at_1") or {}
        header, rule = (" pass@1 |", "---|") if passes else ("", "")
        lines += [
            "| method | tokens/s | speedup | MAT | acceptance | exits | draft cost | MAT / cost "
            "| split d/t/v/o | peak MiB |" + header,
            "|---|---|---|---|---|---|---|---|---|---|" + rule,
        ]
        methods = [m for (t, temp, b, m) in table if (t, temp, b) == (target, temperature, batch)]
        for method in methods:
            m = table[(target, temperature, batch, method)][OVERALL]
            split = m["time_split"]
            split_text = (
                "/".join(f"{100 * split[p]:.0f}" for p in ("draft", "target", "verify", "other"))
                if split
                else "n/a"
            )
            exits = ", ".join(f"{k}:{v}" for k, v in m["exit_histogram"].items()) or "n/a"
            lines.append(
                f"| {method} | {_fmt(m['tokens_per_s'], 1)} | {_fmt(m['speedup'], 2, 'x')} | "
                f"{_fmt(m['mat'])} | {_fmt(m['acceptance'])} | {exits} | {_fmt(m.get('draft_cost'))} | "
                f"{_fmt(m.get('mat_per_cost'))} | {split_text} | "
                + f"{_fmt(m['peak_memory_mib'], 0)} |"
                + _pass_cell(passes, target, temperature, method)
            )
        lines.append("")
        with_positions = [
            (method, table[(target, temperature, batch, method)][OVERALL]["acceptance_by_position"])
            for method in methods
        ]
        with_positions = [(m, a) for m, a in with_positions if a]
        if with_positions:
            width = max(len(a) for _, a in with_positions)
            lines += [
                "Acceptance by draft position, P(draft j accepted | proposed):",
                "",
                "| method | " + " | ".join(str(j + 1) for j in range(width)) + " |",
                "|---|" + "---|" * width,
            ]
            for method, acc in with_positions:
                cells = [_fmt(acc[j]) if j < len(acc) else "" for j in range(width)]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
        if batch == 1:
            categories = sorted(
                {
                    c
                    for (t, temp, b, _), cats in table.items()
                    if (t, temp, b) == (target, temperature, batch)
                    for c in cats
                    if c != OVERALL
                }
            )
            lines += [
                "Speedup (MAT) per category:",
                "",
                "| method | " + " | ".join(categories) + " |",
                "|---|" + "---|" * len(categories),
            ]
            for method in methods:
                by_cat = table[(target, temperature, batch, method)]
                cells = [
                    f"{_fmt(by_cat[c]['speedup'], 2, 'x')} ({_fmt(by_cat[c]['mat'], 2)})"
                    if c in by_cat
                    else "n/a"
                    for c in categories
                ]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
            lines.append("")
    if matches:
        lines += ["Greedy outputs equal to `generate` (fraction of rows):", ""]
        lines += [f"- {k}: {_fmt(v, 3)}" for k, v in sorted(matches.items())]
        lines.append("")
    if result.get("calibrated"):
        lines += ["Calibrated settings per target, temperature and batch size:", ""]
        lines += [f"- {k}: {json.dumps(v)}" for k, v in result["calibrated"].items()]
        lines.append("")
    for key, candidates in (result.get("calibration") or {}).items():
        lines += [
            f"Calibration candidates, {key} (held-out prompts; median tokens/s of every run, best first):",
            "",
            "| thresholds | fixed exit | policy | k | tokens/s | runs | min-max | MAT |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in candidates:
            low, high = c["spread"]
            lines.append(
                f"| {c['thresholds']} | {c['fixed_exit'] or '-'} | {c['draft_length']} | "
                f"{c['num_draft_tokens']} | {c['tokens_per_second']:.1f} | {c['runs']} | "
                f"{low:.1f}-{high:.1f} | {_fmt(c['mat'])} |"
            )
        lines.append("")
    if result.get("ablation"):
        lines += [
            "## Threshold x draft-length ablation (greedy, batch 1)",
            "",
            "| target | threshold | draft tokens | MAT | speedup |",
            "|---|---|---|---|---|",
        ]
        for row in result["ablation"]:
            lines.append(
                f"| {row['target']} | {row['threshold']:.2f} | {row['num_draft_tokens']} | "
                f"{_fmt(row['mat'])} | {_fmt(row['speedup'], 2, 'x')} |"
            )
        lines.append("")
    return "\n".join(lines)


def plots(table: dict, result: dict, out: Path, stem: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    settings = sorted({(t, temp, b) for (t, temp, b, _) in table if b == 1})
    for target, temperature, batch in settings:
        methods = [
            m for (t, temp, b, m) in table if (t, temp, b) == (target, temperature, batch) and m != "generate"
        ]
        categories = sorted(
            {
                c
                for (t, temp, b, _), cats in table.items()
                if (t, temp, b) == (target, temperature, batch)
                for c in cats
            }
        )
        fig, ax = plt.subplots(figsize=(max(8, len(categories) * 0.9), 4))
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            by_cat = table[(target, temperature, batch, method)]
            values = [by_cat.get(c, {}).get("speedup") or 0 for c in categories]
            ax.bar([x + i * width for x in range(len(categories))], values, width, label=method)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(categories))])
        ax.set_xticklabels(categories, rotation=30, ha="right")
        ax.set_ylabel("speedup over generate")
        ax.set_title(f"{target}, T={temperature:g}, batch {batch}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{stem}_speedup_{target}_T{temperature:g}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if result.get("ablation"):
        fig, ax = plt.subplots(figsize=(6, 4))
        by_target = defaultdict(lambda: defaultdict(list))
        for row in result["ablation"]:
            by_target[row["target"]][row["num_draft_tokens"]].append((row["threshold"], row["mat"]))
        for target, by_k in by_target.items():
            for k, points in sorted(by_k.items()):
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{target} k={k}")
        ax.set_xlabel("exit threshold (all early exits)")
        ax.set_ylabel("MAT")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{stem}_mat_vs_threshold.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def write_reports(result: dict, out: Path, stem: str) -> list[Path]:
    table = aggregate(result["records"], result.get("cost_model"))
    matches = greedy_matches(result["records"])
    serialisable = dict(
        result,
        summary={f"{t}|T={temp:g}|B={b}|{m}": cats for (t, temp, b, m), cats in table.items()},
        greedy_matches=matches,
    )
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(serialisable, indent=1, default=str))
    md_path = out / f"{stem}.md"
    md_path.write_text(markdown(result, table, matches))
    return [json_path, md_path, *plots(table, result, out, stem)]
