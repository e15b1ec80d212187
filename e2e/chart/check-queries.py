#!/usr/bin/env python3
"""Every query of the Grafana dashboard and the alert rules names only metrics the operator
exports (read from operator/src/metrics.rs), and every dashboard query names at least one.

usage: check-queries.py METRICS_RS DASHBOARD_JSON RULES_YAML
"""

import json
import re
import sys

NAME = re.compile(r"\bsendense_[a-z0-9_]+\b")


def exported(metrics_rs):
    src = open(metrics_rs).read()
    names = set(re.findall(r'"(sendense_[a-z0-9_]+)"', src))
    histograms = set(re.findall(r'HistogramOpts::new\(\s*"(sendense_[a-z0-9_]+)"', src))
    for h in histograms:
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    return names


def exprs(node, out):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                out.append(v)
            else:
                exprs(v, out)
    elif isinstance(node, list):
        for v in node:
            exprs(v, out)


def main():
    metrics_rs, dashboard, rules = sys.argv[1:4]
    known = exported(metrics_rs)
    if len(known) < 10:
        sys.exit(f"only {len(known)} metric names found in {metrics_rs}: is the parser broken?")
    bad = []
    queries = []
    exprs(json.load(open(dashboard)), queries)
    if not queries:
        bad.append(f"{dashboard}: no queries found")
    for q in queries:
        used = set(NAME.findall(q))
        if not used:
            bad.append(f"dashboard query names no Sendense metric: {q}")
        for m in used - known:
            bad.append(f"dashboard query uses {m}, which the operator does not export: {q}")
    rules_text = open(rules).read()
    used = set(NAME.findall(rules_text))
    if not used:
        bad.append(f"{rules}: no Sendense metric in any rule")
    for m in sorted(used - known):
        bad.append(f"{rules}: {m} is not exported by the operator")
    if bad:
        sys.exit("\n".join(bad))
    print(f"  ok: {len(queries)} dashboard queries and {len(used)} metric names in the rules, all exported")


if __name__ == "__main__":
    main()
