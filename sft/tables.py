"""Markdown tables from data frames and from result CSVs: what the report, the benchmarks and the inference
tests print and write. Needs pandas only, not torch."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd


def fmt_value(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(fmt_value(row[c]).replace("|", "\\|").replace("\n", " ") for c in cols) + " |")
    return "\n".join(lines)


def csv_table(text: str, columns: list[str] | None = None, skip_status: str | None = None) -> str:
    """The CSV `text` as a table (only the `columns` it has, in that order), after its `# ` provenance
    lines. Rows whose status starts with `skip_status` are named in one line under the table instead."""
    provenance = [line[2:].strip() for line in text.splitlines() if line.startswith("# ")]
    frame = pd.read_csv(io.StringIO(text), comment="#")
    skipped = []
    if skip_status and "status" in frame.columns:
        left_out = frame["status"].astype(str).str.startswith(skip_status)
        skipped = [f"({status}): {', '.join(group['variant'])}" for status, group in
                   frame[left_out].groupby("status", sort=False)]
        frame = frame[~left_out]
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    for name in frame.columns:  # a count with blanks reads as floats (2.0): shown as the integers it holds
        values = frame[name]
        if values.dtype.kind == "f" and values.notna().any() and (values.dropna() % 1 == 0).all():
            frame = frame.assign(**{name: pd.Series([None if pd.isna(v) else int(v) for v in values],
                                                     index=values.index, dtype=object)})
    if "mfu" in frame.columns:  # a fraction of the device's peak, shown as a percentage
        frame = frame.assign(mfu=frame["mfu"].map(lambda v: "-" if pd.isna(v) else f"{float(v):.1%}"))
    return ("".join(f"- {line}\n" for line in provenance) + ("\n" if provenance else "") + markdown_table(frame)
            + "".join(f"\n\nNot run {line}" for line in skipped))
