"""The README's comparison table, generated from `bench/compare_systems.py`'s JSON (never typed by hand).

    python bench/compare_table.py demo_out/compare_systems.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {
    "emoq": "EmoQ (speech + transcript, LLM label scoring)",
    "emoq_audio_only": "EmoQ, audio only",
    "emoq_no_supcon": "EmoQ without SupCon",
    "emoq_cross_entropy": "EmoQ with cross-entropy instead of focal",
    "emoq_stage1_head": "EmoQ stage 1 head only (no LLM)",
    "qieemo": "Qieemo (audio only)",
    "patamia": "Patamia et al. 2023 (audio + text)",
}


def cell(stats: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if not stats:
        return "–"
    if stats["n"] == 1:  # one run has no spread to show
        return f"{stats['mean'] * scale:.{digits}f}"
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def time_cell(stats: dict | None, runs: int) -> str:
    """Minutes; says how many runs it covers when some were trained before their time was recorded."""
    text = cell(stats, 1 / 60, 1)
    return text if not stats or stats["n"] == runs else f"{text} ({stats['n']} of {runs} runs timed)"


def table(result: dict) -> str:
    seeds = result["seeds"]
    lines = [f"| system (seeds {', '.join(map(str, seeds))}) | weighted F1 | UA | macro F1 | training time (min) |",
             "|---|---|---|---|---|"]
    for name, entry in result["systems"].items():
        if name == "references":
            for ref, f1 in entry["weighted_f1"].items():
                lines.append(f"| reference: logistic regression on {ref} | {f1:.3f} | – | – | – |")
            continue
        s = entry["summary"]
        n = len(entry["runs"])
        label = LABELS.get(name, name) + (f" (seeds {', '.join(str(r['seed']) for r in entry['runs'])} only)"
                                          if n < len(seeds) else "")
        lines.append(f"| {label} | {cell(s.get('weighted_f1'))} | "
                     f"{cell(s.get('unweighted_accuracy'))} | {cell(s.get('macro_f1'))} | "
                     f"{time_cell(s.get('train_seconds'), n)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))))
