"""Rendering of a report: ``report.md`` and ``report.html`` from the jinja2 templates in ``templates/``.

The tables arrive as formatted cells (:class:`~mkt_torchrec.evaluation.report_tables.Table`); this module only
decides their layout (right-aligned numeric columns, bold baseline rows, coloured cells: a table's
``cell_classes`` where it sets them, e.g. a difference whose seed-level interval excludes 0, else the sign of a
``signed_columns`` cell) and reads the PNG files into the HTML as data URIs, so that ``report.html`` is one
self-contained file (inline CSS, no external links). HTML templates are autoescaped. Under the header both
say which intervals the tables show and list the flagged models.
"""

from __future__ import annotations

import base64
import functools
import os
from typing import Any, Dict, Sequence

import jinja2

from mkt_torchrec.evaluation.report_flags import flag_cell
from mkt_torchrec.evaluation.report_tables import Table, runs_table

__all__ = ["TEMPLATES", "render_markdown", "render_html"]

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")


@functools.lru_cache(maxsize=None)
def _environment() -> jinja2.Environment:
    """The templates' environment: autoescaping for ``*.html.j2``, blocks that leave no blank lines."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                             autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",),
                                                                 default_for_string=False),
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["md_cell"] = lambda text: str(text).replace("|", "\\|")
    return env


def _table_view(t: Table) -> Dict[str, Any]:
    """What the templates need of a table: its cells with their alignment and CSS classes."""
    right = [i > 0 and any(_looks_numeric(row[i]) for row in t.rows) for i in range(len(t.columns))]
    rows = []
    for i, row in enumerate(t.rows):
        cells = []
        for j, c in enumerate(row):
            colour = t.cell_classes.get((i, j), _sign_class(c) if j in t.signed_columns else "")
            cls = [x for x in ("num" if j > 0 and _looks_numeric(c) else "", colour) if x]
            cells.append({"text": str(c), "cls": " ".join(cls)})
        rows.append({"bold": i in t.bold_rows, "cells": cells})
    return {"title": t.title, "note": t.note, "columns": [str(c) for c in t.columns], "right": right, "rows": rows}


def _context(summary: Dict[str, Any], tables: Sequence[Table], figures: Dict[str, Dict[str, str]]) -> Dict[str, Any]:
    """The templates' variables: the header's numbers, the tables, the figures and the table of runs."""
    intervals = summary.get("intervals") or {}
    notes = [intervals[k] for k in ("seed_level", "user_level", "flags") if intervals.get(k)]
    flagged = [f"{m['name']}: {flag_cell(m['flags'], len(m['run_dirs']))}" for m in summary["models"]
               if m.get("flags")]
    return {"entity": summary["entity"], "baseline": summary["baseline"], "n_models": len(summary["models"]),
            "n_runs": len(summary["runs"]), "created": summary["created"], "notes": notes, "flagged": flagged,
            "tables": [_table_view(t) for t in tables], "figures": [dict(f) for f in figures.values()],
            "runs": _table_view(runs_table(summary))}


def render_markdown(summary: Dict[str, Any], tables: Sequence[Table], figures: Dict[str, Dict[str, str]]) -> str:
    """report.md: the same tables, with the figures as links to the PNG files next to it."""
    return _environment().get_template("report.md.j2").render(_context(summary, tables, figures))


def render_html(summary: Dict[str, Any], tables: Sequence[Table], figures: Dict[str, Dict[str, str]],
                png_dir: str) -> str:
    """report.html: one self-contained file (inline CSS, PNGs as data URIs; no external links)."""
    ctx = _context(summary, tables, figures)
    for f in ctx["figures"]:
        with open(os.path.join(png_dir, f["file"]), "rb") as fh:
            f["data"] = base64.b64encode(fh.read()).decode("ascii")
    return _environment().get_template("report.html.j2").render(ctx)


def _sign_class(c: str) -> str:
    """Colour a difference of a ``signed_columns`` cell by its text: "+0.01 (...)" green, "-0.01 (...)" red; an
    interval only if it excludes 0 (*)."""
    if c.startswith("+"):
        return "pos"
    if c.startswith("-") and c != "-":
        return "neg"
    if c.startswith("[") and c.endswith("*"):
        return "pos" if c.startswith("[+") else "neg"
    return ""


def _looks_numeric(c: str) -> bool:
    return bool(c) and (c[0].isdigit() or c[0] in "+-[") and c != "-"
