"""The "Teacher choice" section of `distill report`: the teachers.json that `distill teachers`
wrote into a run folder (or into a folder of its own, which the report accepts alone).

One block per teachers.json: a candidate x metric table (an empty cell says n/a and carries
its reason as a tooltip and in a note under the table) and the agreement matrix. All text
is HTML-escaped.
"""

from html import escape
from pathlib import Path

from distill import rundir
from distill.report.report_data import is_number, read_json_file

# (column, key in a candidate's record, shown as a share)
COLUMNS = [
    ("params", "params", False), ("accuracy", "accuracy", True), ("CE nats/token", "heldout_ce", False),
    ("perplexity", "perplexity", False), ("bits/byte", "bits_per_byte", False), ("agreement", "agreement", True),
    ("mean words", "mean_words", False), ("mean tokens", "mean_tokens", False), ("refusal rate", "refusal_rate", True),
    ("forward tokens/s", "forward_tokens_per_s", False), ("generation tokens/s", "generate_tokens_per_s", False),
]  # fmt: skip


def load_choice(folder: Path, notes: list[str]) -> dict | None:
    """FOLDER/teachers.json as a dict with its folder, or None (absent, or unreadable: noted)."""
    tree = read_json_file(Path(folder) / rundir.TEACHERS, notes)
    if tree is None:
        return None
    if not isinstance(tree, dict) or not isinstance(tree.get("candidates"), list):
        notes.append(f"{Path(folder) / rundir.TEACHERS}: not a teachers.json; left out")
        return None
    return {**tree, "folder": str(Path(folder).resolve())}


def _value(v, share: bool) -> str:
    if not is_number(v):
        return "n/a"
    if share:
        return f"{100 * v:.1f}%"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"


def _cell(record: dict, key: str, share: bool) -> str:
    v = record.get(key)
    if is_number(v):
        return f'<td class="num">{escape(_value(v, share))}</td>'
    why = (record.get("na") or {}).get(key, "")
    return f'<td class="na" title="{escape(str(why))}">n/a</td>'


def _candidates_table(choice: dict) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in ["candidate", *(c for c, _, _ in COLUMNS)])
    rows = []
    for r in choice["candidates"]:
        r = r if isinstance(r, dict) else {}
        cells = "".join(_cell(r, key, share) for _, key, share in COLUMNS)
        rows.append(f'<tr><td class="name">{escape(str(r.get("name")))}</td>{cells}</tr>')
    return f'<table class="teachers"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _agreement_table(choice: dict) -> str:
    a = choice.get("agreement") if isinstance(choice.get("agreement"), dict) else {}
    names, matrix = a.get("names") or [], a.get("matrix") or []
    if len(names) < 2 or len(matrix) != len(names):
        return ""
    head = "".join(f'<th class="name">{escape(str(n))}</th>' for n in names)
    rows = [
        f'<tr><th class="name">{escape(str(n))}</th>'
        + "".join(f'<td class="num">{escape(_value(v, True))}</td>' for v in (line if isinstance(line, list) else []))
        + "</tr>"
        for n, line in zip(names, matrix)
    ]
    rule = {"answer": "final answers", "words": f"the first {a.get('words')} words"}.get(
        a.get("basis"), f"final answers on the {a.get('answer_rows')} rows with a gold answer, the first {a.get('words')} words on the rest"
    )
    return f"<p>agreement on {escape(rule)}:</p><table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _notes(choice: dict) -> str:
    items = []
    for r in choice["candidates"]:
        if isinstance(r, dict) and isinstance(r.get("na"), dict):
            items += [f"{r.get('name')}: {k} n/a ({why})" for k, why in r["na"].items()]
        if isinstance(r, dict) and r.get("template") not in (None, "own"):
            items.append(f"{r.get('name')}: chat rows read through {r['template']}")
    return f'<ul class="missing">{"".join(f"<li>{escape(str(i))}</li>" for i in items)}</ul>' if items else ""


def teachers_section(choices: list[dict], notes: list[str]) -> str:
    """Every teacher comparison given, or a note that there is none; `notes` name unreadable files."""
    noted = "".join(f'<p class="missing">{escape(n)}</p>' for n in notes)
    if not choices:
        return f'<p class="empty">no {rundir.TEACHERS} (written by distill teachers)</p>' + noted
    parts = [noted]
    for c in choices:
        data = c.get("data") if isinstance(c.get("data"), dict) else {}
        m = c.get("machine") if isinstance(c.get("machine"), dict) else {}
        title = f"{c.get('config')}: {data.get('rows')} rows of {data.get('from')}"
        where = f"{c['folder']}; speeds on {m.get('device')} ({m.get('cpu_count')} cores)"
        parts.append(f'<h3>{escape(title)}</h3><p class="path">{escape(where)}</p>')
        parts.append(_candidates_table(c) + _notes(c) + _agreement_table(c))
    return "".join(parts)
