"""`headstart compare RUN...`: the options that differ between runs and their headline metrics, side by side."""

from __future__ import annotations

import json
from pathlib import Path

from headstart import runs
from headstart.data import columns, ljust, rjust
from headstart.tasks import CONFIGS

#: Options that only say where or how a run ran, not what it learned: left out of the comparison.
NOT_COMPARED = ("out", "data_dir", "cache_dir", "resume", "overwrite", "progress", "log", "no_cache", "device")


def compare_runs(run_dirs: list[str | Path]) -> dict:
    """{"runs": names, "options": {option: [value per run]} (only those that differ), "metrics": {metric: [value
    per run]} (each task's headline metrics, and the training time)}."""
    if len(run_dirs) < 2:
        raise ValueError("compare needs at least two run directories.")
    records, metrics = [], []
    for run_dir in map(Path, run_dirs):
        if not (run_dir / runs.METRICS).is_file():
            raise ValueError(
                f"{run_dir} is not a finished run (no {runs.METRICS}); give `headstart train --out` folders."
            )
        records.append(runs.read_record(run_dir))
        metrics.append(json.loads((run_dir / runs.METRICS).read_text()))
    options = {}
    for key in sorted({k for r in records for k in r.options} - set(NOT_COMPARED)):
        values = [r.options.get(key) for r in records]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            options[key] = values
    if len({r.task for r in records}) > 1:
        options = {"task": [r.task for r in records], **options}
    headline = list(dict.fromkeys(k for r in records if r.task in CONFIGS for k in CONFIGS[r.task].headline))
    table = {k: [m.get(k) for m in metrics] for k in headline}
    table["seconds"] = [m.get("training", {}).get("seconds", {}).get("total") for m in metrics]
    return {"runs": [str(d) for d in run_dirs], "options": options, "metrics": table}


def format_comparison(result: dict) -> str:
    names = [Path(r).name or r for r in result["runs"]]
    if len(set(names)) < len(names):  # runs/a/run, runs/b/run: their parent folders tell them apart
        names = ["/".join(Path(r).parts[-2:]) for r in result["runs"]]
    rows = [("", names)]
    rows += [(f"--{k.replace('_', '-')}", [_shown(v) for v in vals]) for k, vals in result["options"].items()]
    if not result["options"]:
        rows.append(("(options)", ["same"] * len(names)))
    rows += [(k, [_shown(v, 1 if k == "seconds" else 4) for v in vals]) for k, vals in result["metrics"].items()]
    width = [max(columns(r[0]) for r in rows)] + [max(columns(r[1][i]) for r in rows) for i in range(len(names))]
    return "\n".join(
        "  ".join([ljust(label, width[0]), *(rjust(v, width[i + 1]) for i, v in enumerate(vals))])
        for label, vals in rows
    )


def _shown(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
