"""The training record of a SoFT run (``s2d soft --self-data``) as a loss curve, a table and JSON.

    python bench/soft_curve.py DRAFT_FOLDER [--tag soft_smollm2]

Reads ``soft_state.pt`` (per-step history) and ``soft_config.json`` (the run's settings and held-out
evaluations) from the draft folder and writes ``bench/results/<tag>.png``, ``<tag>.md`` and ``<tag>.json``:
per-exit training cross-entropy and top-1 agreement with the target (smoothed over 10 steps), and the
held-out CE, KL and agreement at each evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def smooth(values: list[float], width: int = 10) -> list[float]:
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1) : i + 1]
        out.append(sum(window) / len(window))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("draft", type=Path)
    parser.add_argument("--tag", default="soft_smollm2")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    state = torch.load(args.draft / "soft_state.pt", map_location="cpu", weights_only=False)
    record = json.loads((args.draft / "soft_config.json").read_text())
    history, evals, exits = state["history"], record.get("evals", []), record["exits"]
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "exits": exits,
        "steps": record["step"],
        "max_steps": record["max_steps"],
        "train_seconds": record["train_seconds"],
        "tokens_seen": record["tokens_seen"],
        "config": record["config"],
        "kl_weight": record.get("kl_weight"),
        "autocast": record.get("autocast"),
        "evals": evals,
        "history": history,
    }
    (args.out / f"{args.tag}.json").write_text(json.dumps(summary, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ce, ax_ag) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    for j, e in enumerate(exits):
        ax_ce.plot(steps, smooth([h["ce"][j] for h in history]), label=f"exit {e} (train)")
        ax_ag.plot(steps, smooth([h["agreement"][j] for h in history]), label=f"exit {e} (train)")
        if evals:
            ax_ce.plot(
                [v["step"] for v in evals], [v["ce"][j] for v in evals], "o--", label=f"exit {e} held out"
            )
            ax_ag.plot(
                [v["step"] for v in evals],
                [v["agreement"][j] for v in evals],
                "o--",
                label=f"exit {e} held out",
            )
    ax_ce.set_xlabel("optimizer step")
    ax_ce.set_ylabel("cross-entropy of the answer token (nats)")
    ax_ag.set_xlabel("optimizer step")
    ax_ag.set_ylabel("top-1 agreement with the target")
    for ax in (ax_ce, ax_ag):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"SoFT of the first {exits[-1]} layers, exits {exits}: {record['train_seconds'] / 60:.0f} min"
    )
    fig.tight_layout()
    fig.savefig(args.out / f"{args.tag}.png", dpi=100)

    lines = [
        f"# SoFT training record: exits {exits}",
        "",
        f"{record['step']} of {record['max_steps']} optimizer steps, {record['tokens_seen']:,} tokens "
        f"(prompt + answer) seen, {record['train_seconds'] / 60:.1f} min of training; autocast "
        f"{record.get('autocast')}, KL weight {record.get('kl_weight')}, lr {record['config']['lr']}, "
        f"{record['config']['batch_size']} sequences per step.",
        "",
        "Held-out (sequences the draft never trained on) per exit: cross-entropy of the answer token, "
        "coarsened top-32 KL to the target, top-1 agreement with the target:",
        "",
        "| step | " + " | ".join(f"exit {e} CE / KL / agreement" for e in exits) + " |",
        "|---|" + "---|" * len(exits),
    ]
    for v in evals:
        cells = [f"{v['ce'][j]:.3f} / {v['kl'][j]:.3f} / {v['agreement'][j]:.3f}" for j in range(len(exits))]
        lines.append(f"| {v['step']} | " + " | ".join(cells) + " |")
    (args.out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
