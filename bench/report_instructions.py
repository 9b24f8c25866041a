"""The report's section on instructions per resumed connection (bench/instructions.py), and their ratios.

The steady figure beside the rates: a ratio of two callgrind counts of one
run moves by well under 1 % between runs, where a ratio of two rates moves by 15 %.
"""

from __future__ import annotations

from typing import Any

from bench import report


def instructions(results: dict[str, Any], name: str, tls: str) -> float | None:
    rows = (results.get("instructions") or {}).get("rows", [])
    return next((r["instructions"] for r in rows if (r["config"], r["tls"]) == (name, tls)), None)


def ratios(results: dict[str, Any], name: str) -> dict[str, float]:
    """Bare Twisted's instructions per resumed connection over ``name``'s, per TLS version (1.0: as cheap)."""
    out: dict[str, float] = {}
    for tls in ("1.2", "1.3"):
        ratio = report._ratio(instructions(results, report.BASELINE, tls), instructions(results, name, tls))
        if ratio is not None:
            out[tls] = ratio
    return out


def ratio_text(results: dict[str, Any], name: str) -> str:
    """``"; by instructions per connection (callgrind) TLS 1.2 0.95×, TLS 1.3 0.98×"``, or nothing."""
    known = ratios(results, name)
    if not known:
        return ""
    return "; by instructions per connection (callgrind) " + ", ".join(f"TLS {t} {r:.2f}×" for t, r in known.items())


def section(results: dict[str, Any]) -> list[str]:
    measured = results.get("instructions") or {}
    rows = measured.get("rows", [])
    out = ["## Instructions per resumed connection (callgrind)", ""]
    if not rows:
        reasons = "; ".join(f"`{n}`: {r}" for n, r in measured.get("unavailable", {}).items())
        return out + [f"Not measured in this run{': ' + reasons if reasons else ''}.", ""] if measured else []
    key = report.KEY_NAMES.get(rows[0]["key"], rows[0]["key"])
    out += [
        f"Each server ran under `valgrind --tool=callgrind`; after a warm-up its counters were zeroed and one "
        f"client made a fixed number of resumed connections ({key}); the instructions of all the "
        "configuration's server processes (not of redis-server) are divided by the connections. Unlike "
        "rates, these counts repeat from run to run, so the ratios to bare Twisted are the like-for-like "
        "figure. Ratio = bare Twisted's instructions per connection over the configuration's (1.00×: as "
        "cheap; 0.90×: 11 % more work).",
        "",
    ]
    names = list(dict.fromkeys(r["config"] for r in rows))
    versions = list(dict.fromkeys(r["tls"] for r in rows))
    table = []
    for name in names:
        cells = [f"`{name}`"]
        for tls in versions:
            count = instructions(results, name, tls)
            cells += [report._fmt(None if count is None else count / 1e6, ".3f", " M"),
                      report._fmt(ratios(results, name).get(tls), ".2f", "×")]  # fmt: skip
        resumed = [r for r in rows if r["config"] == name]
        cells.append(", ".join(f"{r['resumed']}/{r['connections']}" for r in resumed))
        table.append(cells)
    header = ["server"] + [h for tls in versions for h in (f"TLS {tls}", "× bare")] + ["resumed"]
    return out + report._table(header, table, "l" + "rr" * len(versions) + "r")
