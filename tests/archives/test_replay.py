"""The end-of-run summary tables (archives/replay.py: render_summary) in narrow and wide terminals."""
from __future__ import annotations

import io

from rich.console import Console

from archives.replay import render_summary

NAMES = ["lrml_x_padll_blend_gate_c0p5_w1p2_drop", "dpo", "aqfl_x_logistic_log_ratio_splice_sq",
         "softplus_margin_reweight_c3p1_tanh_w0p2"]
OPERATORS = ["openai:gpt-4o-mini:mutation", "symbolic:crossover"]


def summary() -> dict:
    top = [{"id": 100 + i, "name": name, "fitness": 0.5 - i / 10, "generation": 11, "operator": OPERATORS[i % 2],
            "metrics": {"reward": 1.23456, "kl": 0.04567}, "extra": {"dpo:heldout": 0.61},
            "estimate": {"mean": 0.5 - i / 10, "se": 0.0123, "seeds": 4, "gain": 0.0456} if i < 2 else None}
           for i, name in enumerate(NAMES)]
    return {
        "run": "runs/synthetic-pref-20261204-101010-12345", "fitness": "synthetic-pref", "generations": 12,
        "generations_planned": 12, "last_generation": 12, "evaluations": 104, "unique_genomes": 98, "invalid": 3,
        "failed": {"invalid": 3, "error": 1}, "dedup_saved": 6, "hash_duplicates": 4, "behaviour_duplicates": 2,
        "offspring_valid_share": 0.9, "elites": 12, "coverage": 0.75, "qd_score": 12.5, "baseline": "dpo",
        "baseline_fitness": 0.4, "key_metrics": ["reward", "kl"], "extra_fitness": ["dpo:heldout"], "top": top,
        "best_name": NAMES[0], "best_fitness": 0.5, "best_estimate": None, "ranking": "fitness",
        "operators": {"openai:gpt-4o-mini": {"made": 40, "valid_share": 0.8, "improved_share": 0.2},
                      "symbolic": {"made": 60, "valid_share": 0.95, "improved_share": 0.1}},
    }


def rendered(width: int) -> list[str]:
    out = io.StringIO()
    render_summary(summary(), Console(file=out, width=width, color_system=None, force_terminal=False))
    return out.getvalue().splitlines()


def table_rows(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("│")]


def test_an_80_column_terminal_shows_every_loss_name_whole():
    lines = rendered(80)
    assert all(len(line) <= 80 for line in lines)
    rows = table_rows(lines)
    for i, name in enumerate(NAMES):
        assert any(f"│ {100 + i} │ {name} " in row for row in rows), f"{name} is cut:\n" + "\n".join(lines)
    # The columns that did not fit follow in a second table, keyed by id, nothing cut either.
    assert any("Best losses: metrics and origin" in line for line in lines)
    for i, operator in enumerate(OPERATORS * 2):
        assert any(row.startswith(f"│ {100 + i} ") and operator in row for row in rows)
    assert any("0.5000±0.0123 (4)" in row for row in rows) and "…" not in "\n".join(rows)


def test_a_wide_terminal_keeps_one_table():
    lines = rendered(200)
    assert not any("metrics and origin" in line for line in lines)
    row = next(row for row in table_rows(lines) if row.startswith("│ 102 "))
    assert NAMES[2] in row and OPERATORS[0] in row and "1.2346" in row
