"""Ratios, goals and tables of the proxy benchmark (bench/proxy.py), from measured figures
only: every ratio divides two numbers taken in the same run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

# Issue 4's goals: (key, description, measured value's kind, comparison, target)
GOALS = (
    ("bulk_vs_haproxy_plain", "bulk MB/s, plain: spicetap / haproxy", ">=", 0.75),
    ("bulk_vs_mitmproxy_plain", "bulk MB/s, plain: spicetap / mitmproxy", ">=", 3.0),
    ("added_p50_us_plain", "added latency per traversal, p50, plain (us)", "<=", 50.0),
    ("added_p99_us_plain", "added latency per traversal, p99, plain (us)", "<=", 200.0),
    ("bulk_vs_haproxy_tls", "bulk MB/s, TLS both legs: spicetap / haproxy", ">=", 0.75),
)


def _get(r: dict[str, Any] | None, *path: str) -> float | None:
    value: Any = r
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def derive(mode: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per proxy: its figures and its ratios to haproxy's."""
    haproxy = mode.get("haproxy")
    out: dict[str, dict[str, Any]] = {}
    for name, r in mode.items():
        if "error" in r:
            out[name] = {"error": r["error"]}
            continue
        row: dict[str, Any] = {
            "bulk_mb_per_s": _get(r, "bulk", "mb_per_s"),
            "bulk_done_mb_per_s": _get(r, "bulk", "done_mb_per_s"),
            "bulk_busy_after_s": _get(r, "bulk", "busy_after_s"),
            "bulk_cpu_s_per_gb": _get(r, "bulk", "proxy_cpu_s_per_gb"),
            # the proxy's own process, and those it started (spicetap's recording process)
            "bulk_main_cpu_s_per_gb": _get(r, "bulk", "main_cpu_s_per_gb"),
            "bulk_children_cpu_s_per_gb": _get(r, "bulk", "children_cpu_s_per_gb"),
            "bulk_peak_rss_mb": _get(r, "bulk", "peak_rss_mb"),
            "small_msg_per_s": _get(r, "small", "msg_per_s"),
            "small_done_msg_per_s": _get(r, "small", "done_msg_per_s"),
            "small_cpu_us_per_msg": _get(r, "small", "proxy_cpu_us_per_msg"),
            "rtt_p50_us": _get(r, "latency", "rtt_p50_us"),
            "rtt_p99_us": _get(r, "latency", "rtt_p99_us"),
            # paired with direct round trips taken in turn with them
            "added_p50_us": _get(r, "latency", "added_p50_us"),
            "added_p99_us": _get(r, "latency", "added_p99_us"),
            "rss_mb": _get(r, "rss", "rss_mb"),
            "pss_mb": _get(r, "rss", "pss_mb"),
            "idle_rss_mb": _get(r, "rss", "idle_rss_mb"),
            "recorded_ok": None,
        }
        row["bulk_vs_haproxy"] = _ratio(row["bulk_mb_per_s"], _get(haproxy, "bulk", "mb_per_s"))
        row["bulk_done_vs_haproxy"] = _ratio(
            row["bulk_done_mb_per_s"], _get(haproxy, "bulk", "mb_per_s")
        )
        row["small_vs_haproxy"] = _ratio(
            row["small_msg_per_s"], _get(haproxy, "small", "msg_per_s")
        )
        if "recording" in r:
            row["recorded_ok"] = bool(r["recording"].get("ok")) and bool(
                r.get("rss_recording", {}).get("ok")
            )
        out[name] = row
    return out


def summarize(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    derived = {mode: derive(rows) for mode, rows in results.items()}
    spicetap = {mode: derived[mode].get("spicetap", {}) for mode in derived}
    mitm = derived.get("plain", {}).get("mitmproxy", {})
    measured = {
        "bulk_vs_haproxy_plain": spicetap.get("plain", {}).get("bulk_vs_haproxy"),
        "bulk_vs_mitmproxy_plain": _ratio(
            spicetap.get("plain", {}).get("bulk_mb_per_s"), mitm.get("bulk_mb_per_s")
        ),
        "added_p50_us_plain": spicetap.get("plain", {}).get("added_p50_us"),
        "added_p99_us_plain": spicetap.get("plain", {}).get("added_p99_us"),
        "bulk_vs_haproxy_tls": spicetap.get("tls", {}).get("bulk_vs_haproxy"),
    }
    goals = []
    for key, text, op, target in GOALS:
        value = measured[key]
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        goals.append(
            {"goal": key, "text": text, "target": f"{op} {target:g}", "measured": value, "met": met}
        )
    # The same bulk ratios once the recording has caught up (the proxy's CPU went quiet).
    extra = {
        "bulk_done_vs_haproxy_plain": spicetap.get("plain", {}).get("bulk_done_vs_haproxy"),
        "bulk_done_vs_haproxy_tls": spicetap.get("tls", {}).get("bulk_done_vs_haproxy"),
        "bulk_done_vs_mitmproxy_done_plain": _ratio(
            spicetap.get("plain", {}).get("bulk_done_mb_per_s"), mitm.get("bulk_done_mb_per_s")
        ),
    }
    return {"derived": derived, "goals": goals, "recording_caught_up": extra}


def _f(value: Any, fmt: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{suffix}"


COLUMNS = (
    ("bulk MB/s", "bulk_mb_per_s", ",.0f", ""),
    ("x haproxy", "bulk_vs_haproxy", ".2f", "x"),
    ("done MB/s", "bulk_done_mb_per_s", ",.0f", ""),
    ("CPU s/GB", "bulk_cpu_s_per_gb", ".2f", ""),
    ("bulk peak MB", "bulk_peak_rss_mb", ",.0f", ""),
    ("small msg/s", "small_msg_per_s", ",.0f", ""),
    ("x haproxy", "small_vs_haproxy", ".2f", "x"),
    ("done msg/s", "small_done_msg_per_s", ",.0f", ""),
    ("CPU us/msg", "small_cpu_us_per_msg", ".2f", ""),
    ("RTT p50 us", "rtt_p50_us", ",.0f", ""),
    ("RTT p99 us", "rtt_p99_us", ",.0f", ""),
    ("added p50 us", "added_p50_us", ",.0f", ""),
    ("added p99 us", "added_p99_us", ",.0f", ""),
    ("RSS MB", "rss_mb", ",.1f", ""),
    ("PSS MB", "pss_mb", ",.1f", ""),
)


def print_tables(console: Console, data: dict[str, Any]) -> None:
    sessions = data["sizes"]["sessions"]
    for mode, rows in data["derived"].items():
        title = "plain" if mode == "plain" else "TLS on both legs"
        table = Table(
            title=f"{title}: added latency per traversal; memory at {sessions} sessions; "
            "done = until the proxy's CPU went quiet (recording caught up)"
        )
        table.add_column("proxy")
        for head, *_rest in COLUMNS:
            table.add_column(head, justify="right")
        table.add_column("recorded")
        for name, row in rows.items():
            if "error" in row:
                table.add_row(name, f"failed: {row['error'][:80]}")
                continue
            cells = [_f(row.get(key), fmt, suffix) for _h, key, fmt, suffix in COLUMNS]
            ok = row.get("recorded_ok")
            table.add_row(name, *cells, "" if ok is None else ("all, verified" if ok else "NO"))
        console.print(table)
    goals = Table(title="issue 4 goals (measured in this run)")
    for col in ("goal", "target", "measured", "met"):
        goals.add_column(col)
    for g in data["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "NO")
        goals.add_row(g["text"], g["target"], _f(g["measured"], ".2f"), met)
    console.print(goals)


MARKDOWN = (
    ("bulk MB/s", "bulk_mb_per_s", ",.0f", ""),
    ("x haproxy", "bulk_vs_haproxy", ".2f", "x"),
    ("done MB/s", "bulk_done_mb_per_s", ",.0f", ""),
    ("bulk peak MB", "bulk_peak_rss_mb", ",.0f", ""),
    ("small msg/s", "small_msg_per_s", ",.0f", ""),
    ("done msg/s", "small_done_msg_per_s", ",.0f", ""),
    ("added p50 us", "added_p50_us", ",.0f", ""),
    ("added p99 us", "added_p99_us", ",.0f", ""),
    ("RSS MB", "rss_mb", ",.0f", ""),
    ("PSS MB", "pss_mb", ",.0f", ""),
)


def markdown_table(data: dict[str, Any]) -> str:
    """The README's table, ready to paste."""
    heads = ["mode", "proxy", *(head for head, *_rest in MARKDOWN)]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for mode, rows in data["derived"].items():
        for name, row in rows.items():
            if "error" in row:
                cells = ["failed"] + [""] * (len(MARKDOWN) - 1)
            else:
                cells = [_f(row.get(key), fmt, suffix) for _h, key, fmt, suffix in MARKDOWN]
            lines.append(f"| {mode} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
