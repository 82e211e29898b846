#!/usr/bin/env python3
"""Checks deploy/grafana/hami-rs.json against docs/metrics.md and the sources.

* The dashboard is importable: valid JSON, uid and title, every panel with a
  gridPos, every query target with a unique refId and an expr, a
  `datasource` variable.
* Every metric the dashboard's queries use (panels' `expr`, variables'
  queries), and every metric in docs/metrics.md's ```promql examples, is in
  docs/metrics.md's tables (those whose first column is `metric`);
  `_bucket`, `_sum` and `_count` resolve to a documented histogram.
* Every label those queries use (selectors, by/without/on/ignoring/
  group_left/group_right, `{{label}}` in legends, label_values) is
  documented for a metric of that query, or is `instance`/`job`.
* Every metric in the tables is registered (`.register("name", ...)`) in a
  Rust source under crates/*/src, every registered metric is in the
  tables, and every label the tables give a metric is a label literal of
  the file that registers it (or of the build-info labels it uses).

Python 3 standard library only. Exit status 0 when all hold, 1 otherwise.
Usage: python3 deploy/grafana/check.py [--root REPO]
"""

import argparse
import json
import pathlib
import re
import sys

TARGET_LABELS = {"instance", "job"}  # set by Prometheus on every target
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "bool", "inf", "nan", "atan2",
}
NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"
LABEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

errors = []


def error(msg):
    errors.append(msg)


# --------------------------------------------------------------------------
# docs/metrics.md


def md_cells(line):
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")):
        return None
    return [c.strip() for c in line[1:-1].split("|")]


def parse_doc_tables(text):
    """{metric: {"labels": set, "types": set, "lines": [int]}} from every
    table whose header's first cell is `metric`."""
    docs = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        head = md_cells(lines[i])
        if head and head[0].lower() == "metric" and i + 1 < len(lines) and re.match(
            r"^\|[\s:|-]+\|$", lines[i + 1].strip()
        ):
            cols = [h.lower() for h in head]
            li = cols.index("labels") if "labels" in cols else None
            ti = cols.index("type") if "type" in cols else None
            i += 2
            while i < len(lines):
                row = md_cells(lines[i])
                if row is None:
                    break
                names = re.findall(r"`([^`]+)`", row[0])
                if len(names) != 1 or not re.fullmatch(NAME, names[0]):
                    error(f"docs/metrics.md:{i + 1}: first cell is not one `metric_name`: {row[0]!r}")
                    i += 1
                    continue
                d = docs.setdefault(names[0], {"labels": set(), "types": set(), "lines": []})
                d["lines"].append(i + 1)
                if li is not None and li < len(row):
                    d["labels"] |= {l for l in re.findall(r"`([^`]+)`", row[li]) if LABEL_RE.match(l)}
                if ti is not None and ti < len(row):
                    d["types"].add(row[ti].strip("` ").lower())
                i += 1
            continue
        i += 1
    return docs


def promql_blocks(text):
    return re.findall(r"```promql\n(.*?)```", text, flags=re.S)


# --------------------------------------------------------------------------
# Rust sources


def rust_sources(root):
    for p in sorted((root / "crates").glob("*/src/**/*.rs")):
        yield p


def non_test_part(text):
    """The file up to its `#[cfg(test)]` module, if any."""
    k = text.find("#[cfg(test)]")
    return text if k < 0 else text[:k]


def label_literals(text):
    return set(re.findall(r"\(\s*\"([a-z_][a-z0-9_]*)\"\s*,", text))


def registered_metrics(root):
    """{metric: [(relpath, line, labels allowed)]}"""
    out = {}
    srcs = list(rust_sources(root))
    by_stem = {}
    for p in srcs:
        by_stem.setdefault(p.stem, []).append(p)
    for p in srcs:
        text = non_test_part(p.read_text(encoding="utf-8", errors="replace"))
        regs = list(re.finditer(r"\.register\(\s*\"(" + NAME + r")\"", text))
        if not regs:
            continue
        labels = label_literals(text)
        # Labels built by a helper module's `labels()` (hami_api::build_info).
        for mod in set(re.findall(r"(\w+)::labels\(\)", text)):
            for q in by_stem.get(mod, []):
                labels |= label_literals(non_test_part(q.read_text(encoding="utf-8")))
        names = {m.group(1) for m in regs}
        labels -= names
        rel = p.relative_to(root).as_posix()
        for m in regs:
            line = text.count("\n", 0, m.start(1)) + 1
            out.setdefault(m.group(1), []).append((rel, line, labels))
    return out


def literal_mentions(root, name):
    """Files under crates/ whose text holds "name" as a string literal."""
    hits = []
    for p in sorted((root / "crates").rglob("*.rs")):
        if f'"{name}' in p.read_text(encoding="utf-8", errors="replace"):
            hits.append(p.relative_to(root).as_posix())
    return hits


# --------------------------------------------------------------------------
# PromQL


def analyze(expr):
    """(metrics: [(name, selector labels)], other labels) used by expr."""
    s = re.sub(r"\"(?:\\.|[^\"\\])*\"|'(?:\\.|[^'\\])*'|`[^`]*`", '""', expr)
    s = re.sub(r"#[^\n]*", " ", s)  # comments
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges, subqueries
    s = re.sub(r"\$\{[^}]*\}|\$\w+", " ", s)  # Grafana variables
    metrics = []
    other = set()

    def selector(m):
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        if m.group(1) and m.group(1) not in KEYWORDS:
            metrics.append((m.group(1), labels))
            return " "
        error_ctx.append(f"selector without a metric name: {{{m.group(2)}}}")
        return " "

    error_ctx = []
    s = re.sub(r"(" + NAME + r")?\s*\{([^}]*)\}", selector, s)

    def clause(m):
        other.update(l.strip() for l in m.group(2).split(",") if l.strip())
        return " "

    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", clause, s)
    for m in re.finditer(r"(?<![\w.])(" + NAME + r")", s):
        name = m.group(1)
        rest = s[m.end():].lstrip()
        if name.lower() in KEYWORDS or rest.startswith("("):
            continue  # operator keyword, function or aggregation
        metrics.append((name, set()))
    return metrics, other, error_ctx


def resolve(name, docs):
    """(documented base name, extra labels) or (None, None)."""
    if name in docs:
        return name, set()
    for suf in HISTOGRAM_SUFFIXES:
        base = name[: -len(suf)]
        if name.endswith(suf) and base in docs and "histogram" in docs[base]["types"]:
            return base, ({"le"} if suf == "_bucket" else set())
    return None, None


def check_query(where, expr, docs, used, legend=None):
    metrics, other, ctx = analyze(expr)
    for c in ctx:
        error(f"{where}: {c}")
    if not metrics:
        error(f"{where}: no metric in {expr!r}")
    allowed_any = set(TARGET_LABELS)
    unknown = False
    for name, sel in metrics:
        base, extra = resolve(name, docs)
        if base is None:
            error(f"{where}: metric {name} is not in docs/metrics.md's tables")
            unknown = True
            continue
        used.setdefault(base, set()).add(where)
        allowed = docs[base]["labels"] | extra | TARGET_LABELS
        allowed_any |= allowed
        for l in sorted(sel - allowed):
            error(f"{where}: label {l} is not documented for {name}")
    if unknown:
        return  # the labels of an unknown metric cannot be judged
    for l in sorted(other - allowed_any):
        error(f"{where}: label {l} (by/on/group) is on no metric of the query")
    if legend:
        for l in re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend):
            if l not in allowed_any:
                error(f"{where}: legend label {l} is on no metric of the query")


# --------------------------------------------------------------------------
# Grafana


def walk_panels(panels):
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


def check_dashboard(dash, docs, used):
    if dash.get("uid") != "hami-rs-overview":
        error(f"dashboard uid is {dash.get('uid')!r}, not 'hami-rs-overview'")
    if dash.get("title") != "hami-rs: GPU sharing":
        error(f"dashboard title is {dash.get('title')!r}")
    if not isinstance(dash.get("schemaVersion"), int):
        error("dashboard has no integer schemaVersion")
    variables = {v.get("name"): v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        error("no `datasource` variable of type datasource, query prometheus")
    for name, v in variables.items():
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        where = f"variable ${name}"
        m = re.fullmatch(r"\s*label_values\(\s*(.*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", q)
        if not m:
            check_query(where, q, docs, used)
            continue
        check_query(where, m.group(1), docs, used)
        metrics, _, _ = analyze(m.group(1))
        for mname, _ in metrics:
            base, extra = resolve(mname, docs)
            if base and m.group(2) not in docs[base]["labels"] | extra:
                error(f"{where}: label {m.group(2)} is not documented for {mname}")
    panels = dash.get("panels")
    if not isinstance(panels, list) or not panels:
        error("dashboard has no panels")
        return 0, 0
    ids = set()
    n_panels = n_targets = 0
    for p in walk_panels(panels):
        n_panels += 1
        title = p.get("title", "?")
        g = p.get("gridPos")
        if not isinstance(g, dict) or not all(isinstance(g.get(k), int) for k in "xywh"):
            error(f"panel {title!r}: gridPos needs integer x, y, w, h")
        elif g["x"] + g["w"] > 24:
            error(f"panel {title!r}: gridPos wider than 24 columns")
        if p.get("id") in ids:
            error(f"panel {title!r}: duplicate id {p.get('id')}")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        targets = p.get("targets")
        if not targets:
            error(f"panel {title!r}: no targets")
            continue
        refs = set()
        for t in targets:
            n_targets += 1
            ref = t.get("refId")
            where = f"panel {title!r} target {ref}"
            if not ref or ref in refs:
                error(f"panel {title!r}: missing or duplicate refId {ref!r}")
            refs.add(ref)
            expr = t.get("expr")
            if not expr:
                error(f"{where}: no expr")
                continue
            check_query(where, expr, docs, used, t.get("legendFormat"))
    return n_panels, n_targets


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=pathlib.Path(__file__).resolve().parents[2], type=pathlib.Path)
    args = ap.parse_args()
    root = args.root
    doc_path = root / "docs" / "metrics.md"
    dash_path = root / "deploy" / "grafana" / "hami-rs.json"

    doc_text = doc_path.read_text(encoding="utf-8")
    docs = parse_doc_tables(doc_text)
    if not docs:
        error("docs/metrics.md has no table with a `metric` column")
    regs = registered_metrics(root)

    print(f"registered in crates/*/src: {len(regs)} metric names")
    for name in sorted(regs):
        where = ", ".join(f"{f}:{l}" for f, l, _ in regs[name])
        print(f"  {name}  ({where})")

    # Docs against the sources.
    for name, d in sorted(docs.items()):
        if name not in regs:
            hits = literal_mentions(root, name)
            also = f" (the string appears only in {', '.join(hits)})" if hits else " (not found under crates/)"
            error(f"docs/metrics.md:{d['lines'][0]}: {name} is documented but no source registers it{also}")
            continue
        allowed = set().union(*(l for _, _, l in regs[name]))
        if "histogram" in d["types"]:
            allowed.add("le")
        for l in sorted(d["labels"] - allowed):
            error(f"docs/metrics.md:{d['lines'][0]}: label {l} of {name} is no label literal of "
                  f"{', '.join(f for f, _, _ in regs[name])}")
    for name in sorted(set(regs) - set(docs)):
        f, l, _ = regs[name][0]
        error(f"{f}:{l}: {name} is registered but not in docs/metrics.md's tables")

    # The dashboard.
    used = {}
    try:
        dash = json.loads(dash_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        error(f"{dash_path}: {e}")
        dash = None
    n_panels = n_targets = 0
    if dash is not None:
        n_panels, n_targets = check_dashboard(dash, docs, used)

    # The docs' own examples.
    n_examples = 0
    for k, block in enumerate(promql_blocks(doc_text)):
        n_examples += 1
        check_query(f"docs/metrics.md promql block {k + 1}", block, docs, {})

    print(f"documented in docs/metrics.md: {len(docs)} metric names")
    print(f"dashboard: {n_panels} panels, {n_targets} query targets, "
          f"{len(used)} metric names used:")
    for name in sorted(used):
        n = len(used[name])
        print(f"  {name}  ({n} {'query' if n == 1 else 'queries'})")
    unused = sorted(set(docs) - set(used))
    if unused:
        print(f"documented but not on the dashboard: {', '.join(unused)}")
    print(f"docs promql blocks checked: {n_examples}")
    if errors:
        print(f"\nFAIL: {len(errors)} problem(s):")
        for e in errors:
            print(f"  {e}")
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
