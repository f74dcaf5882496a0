"""A trajectory (JSONL) as one self-contained HTML page: no scripts or styles fetched."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d232b}
header{background:#1d232b;color:#fff;padding:16px 24px}
header h1{margin:0 0 6px;font-size:18px} header .meta{opacity:.85}
main{max-width:1100px;margin:0 auto;padding:16px 24px}
.turn{background:#fff;border:1px solid #dde1e6;border-radius:8px;margin:14px 0;padding:12px 16px}
.turn h2{font-size:15px;margin:0 0 8px} .tag{font-size:12px;color:#5b6673}
pre{background:#0f1419;color:#e6e1cf;padding:10px;border-radius:6px;overflow:auto;
white-space:pre-wrap;word-break:break-word;max-height:420px;margin:6px 0}
pre.out{background:#f0f2f5;color:#1d232b} pre.err{background:#fdecec;color:#8a1c1c}
details{margin:6px 0 6px 12px;border-left:3px solid #9aa7b5;padding-left:10px}
details.depth1{border-color:#3b82f6} details.depth2{border-color:#a855f7}
summary{cursor:pointer;color:#374151}
.final{background:#ecfdf3;border-color:#34d399} .stopped{background:#fff7e6;border-color:#f59e0b}
.failed{background:#fdecec;border-color:#ef4444}
table{border-collapse:collapse;margin-top:6px}
td,th{padding:3px 10px;border-bottom:1px solid #e5e7eb;text-align:left}
"""


def load_trajectory(path: Path) -> list[dict[str, Any]]:
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise ValueError(f"line {number} is not JSON") from None
        if not isinstance(entry, dict) or "kind" not in entry:
            raise ValueError(f"line {number} has no 'kind'")
        entries.append(entry)
    return entries


def _e(value: Any) -> str:
    return html.escape(str(value))


def _usage_line(usage: dict[str, Any] | None) -> str:
    if not usage:
        return ""
    return (f"{usage.get('input_tokens', 0):,} in / {usage.get('output_tokens', 0):,} out tokens"
            f" · ${usage.get('cost_usd', 0):.4f}")  # fmt: skip


def _subcalls(log: list[dict[str, Any]]) -> str:
    parts = []
    for group in log or []:
        depth = group.get("depth", 0)
        for i, call in enumerate(group.get("calls", []), 1):
            inner = ""
            if call.get("trajectory"):
                inner = f"<div class='child'>{_entries(call['trajectory'])}</div>"
            parts.append(
                f"<details class='subcall depth{depth}'><summary>{_e(group.get('kind'))}_query "
                f"{i} · {_e(group.get('model'))} · depth {depth}</summary>"
                f"<div class='tag'>prompt</div><pre class='out'>{_e(call.get('prompt', ''))}</pre>"
                f"<div class='tag'>answer</div><pre class='out'>{_e(call.get('response', ''))}"
                f"</pre>{inner}</details>"
            )
    return "".join(parts)


def _entries(entries: list[dict[str, Any]]) -> str:
    out = []
    for entry in entries:
        kind = entry.get("kind")
        depth = entry.get("depth", 0)
        where = f"turn {entry.get('iteration', '?')} · depth {depth} · t={entry.get('t', 0)}s"
        if kind == "llm":
            out.append(
                f"<section class='turn model'><h2>Model reply</h2><div class='tag'>{_e(where)}"
                f" · {_e(entry.get('model'))} · prompt {entry.get('prompt_chars', 0):,} chars · "
                f"{_e(_usage_line(entry.get('usage')))}</div>"
                f"<pre class='out'>{_e(entry.get('response', ''))}</pre></section>"
            )
        elif kind == "cell":
            error = entry.get("error") or {}
            subs = entry.get("subcalls") or {}
            out.append(
                f"<section class='turn cell'><h2>Code</h2><div class='tag'>{_e(where)} · "
                f"{subs.get('count', 0)} sub-calls · {entry.get('execution_time', 0):.3f}s in the "
                f"sandbox{' · trapped: ' + _e(entry['trapped']) if entry.get('trapped') else ''}"
                f"</div><pre>{_e(entry.get('code', ''))}</pre>"
                + (f"<pre class='out'>{_e(entry['stdout'])}</pre>" if entry.get("stdout") else "")
                + (
                    f"<pre class='err'>{_e(error.get('traceback') or error.get('message'))}</pre>"
                    if error
                    else ""
                )
                + _subcalls(entry.get("subcall_log") or [])
                + "</section>"
            )
        elif kind == "compaction":
            out.append(
                f"<section class='turn model'><h2>Compaction {entry.get('count', '')}</h2>"
                f"<div class='tag'>{_e(where)} · {entry.get('tokens_before', 0):,} → "
                f"{entry.get('tokens_after', 0):,} tokens (limit "
                f"{entry.get('limit_tokens', 0):,})</div>"
                f"<pre class='out'>{_e(entry.get('summary', ''))}</pre></section>"
            )
        elif kind == "final":
            status = entry.get("status", "")
            css = "final" if status == "completed" else status
            rows = "".join(
                f"<tr><td>{_e(m)}</td><td>{u.get('calls', 0)}</td>"
                f"<td>{u.get('input_tokens', 0):,}</td><td>{u.get('output_tokens', 0):,}</td>"
                f"<td>${u.get('cost_usd', 0):.4f}</td></tr>"
                for m, u in (entry.get("usage") or {}).items()
            )
            reason = entry.get("stop_reason") or entry.get("error") or ""
            out.append(
                f"<section class='turn {css}'><h2>Final answer ({_e(status)})</h2>"
                f"<div class='tag'>depth {depth} · {entry.get('iterations', 0)} iterations · "
                f"{entry.get('execution_time', 0)}s {('· ' + _e(reason)) if reason else ''}</div>"
                f"<pre class='out answer'>{_e(entry.get('answer'))}</pre>"
                f"<table><tr><th>model</th><th>calls</th><th>input</th><th>output</th>"
                f"<th>cost</th></tr>{rows}</table></section>"
            )
    return "".join(out)


def render(entries: list[dict[str, Any]], title: str = "RLM run") -> str:
    roots = [e for e in entries if e.get("depth", 0) == 0]
    final = next((e for e in reversed(roots) if e.get("kind") == "final"), {})
    turns = len([e for e in roots if e.get("kind") == "llm"])
    meta = (f"run {final.get('run_id', '?')} · {turns} model turns · "
            f"{final.get('total_tokens', 0):,} tokens · ${final.get('total_cost_usd', 0):.4f} · "
            f"{final.get('execution_time', 0)}s · {final.get('status', 'unfinished')}")  # fmt: skip
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
        f"<header><h1>{_e(title)}</h1><div class='meta'>{_e(meta)}</div></header>"
        f"<main>{_entries(roots)}</main></body></html>"
    )
