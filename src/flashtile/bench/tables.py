"""Helpers the bench's report modules share: the marks of results that were not timed, the
providers and rows a table has, a result's time and table cell, the notes on what was not
measured, and the writing of a report's .md and .json.

Pure Python over a list of results: dataclasses with a case, a provider, a status ("ok",
"skipped", "failed", "error", as measure.Result's), ms and, but for decode's, a mode.
measure.Result names its case `shape`, so of these it takes only providers().
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeVar

from flashtile.bench.measure import MODES

R = TypeVar("R")  # a result, as above

MARK = {"skipped": "-", "failed": "FAIL", "error": "err"}


def providers(results: list[R]) -> list[str]:
    """Providers in the order they were run, leaving out those skipped everywhere (their
    columns would be empty; the notes say why)."""
    seen = dict.fromkeys(r.provider for r in results)
    return [p for p in seen if any(r.provider == p and r.status != "skipped" for r in results)]


def cases(results: list[R]) -> list[Any]:
    """The cases in the order measured."""
    return list(dict.fromkeys(r.case for r in results))


def rows(results: list[R]) -> list[tuple[Any, str]]:
    """(case, mode) in the order measured, modes in MODES order within a case."""
    modes = [m for m in MODES if any(r.mode == m for r in results)]
    return [(c, m) for c in cases(results) for m in modes
            if any(r.case == c and r.mode == m for r in results)]


def index(results: list[R]) -> dict[tuple[Any, str, str], R]:
    """Each result by (case, provider, mode)."""
    return {(r.case, r.provider, r.mode): r for r in results}


def ms(r: R | None) -> float | None:
    """The time of a result that was timed, else None."""
    return r.ms if r is not None and r.status == "ok" else None


def cell(r: R | None, value: float | None, fmt: str = "{:.3f}") -> str:
    """`value` formatted where r was timed; "-" where there is no result or value, else r's
    MARK. The default fmt is the one of milliseconds."""
    if r is None:
        return "-"
    if r.status != "ok":
        return MARK[r.status]
    return fmt.format(value) if value is not None else "-"


def not_measured(results: list[R], modes: bool = True) -> list[str]:
    """One line per provider, outcome, case and reason that is not a measurement; an error
    names its mode too, where results have modes (decode's have none)."""
    lines = []
    for r in results:
        if r.status == "ok":
            continue
        where = r.case.label() + (f" {r.mode}" if modes and r.status == "error" else "")
        line = f"- {r.provider} {r.status} at {where}: {r.note}"
        if line not in lines:
            lines.append(line)
    return lines


def json_ready(x):
    """NaN and infinities as null, so that the JSON is strict."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_ready(v) for v in x]
    return x


def write_report(out_dir: Path, name: str, markdown: str, data: dict) -> None:
    """name.md and name.json in out_dir, made if missing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(markdown)
    (out_dir / f"{name}.json").write_text(json.dumps(json_ready(data), indent=1) + "\n")
