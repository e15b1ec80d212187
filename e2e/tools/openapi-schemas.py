#!/usr/bin/env python3
"""Writes kubeconform JSON schemas from a running kube-apiserver's OpenAPI v2 document.

kubeconform downloads its schemas from the internet by default; this machine cannot reach it,
and the schemas must match the pinned Kubernetes version and our CRDs anyway. So: read
`/openapi/v2` (which includes every installed CRD), and for every kind write
`<kind>-<group prefix>-<version>.json` (kubeconform's `{{ .ResourceKind }}{{ .KindSuffix }}`),
each a standalone schema carrying the definitions it references. Strict, like
openapi2jsonschema --strict: objects with declared properties reject unknown ones.

usage: openapi-schemas.py OPENAPI_V2_JSON OUT_DIR
"""

import copy
import json
import os
import sys


def kind_suffix(group, version):
    # kubeconform: "-" + first label of the group (or the version for the core group) + ...
    if not group:
        return f"-{version.lower()}"
    return f"-{group.split('.')[0].lower()}-{version.lower()}"


def refs(node, out):
    if isinstance(node, dict):
        r = node.get("$ref")
        if isinstance(r, str) and r.startswith("#/definitions/"):
            out.add(r[len("#/definitions/"):])
        for v in node.values():
            refs(v, out)
    elif isinstance(node, list):
        for v in node:
            refs(v, out)


def closure(defs, name):
    seen, todo = set(), [name]
    while todo:
        n = todo.pop()
        if n in seen or n not in defs:
            continue
        seen.add(n)
        found = set()
        refs(defs[n], found)
        todo.extend(found - seen)
    return seen


def strict(node):
    """additionalProperties: false wherever properties are declared and nothing says otherwise."""
    if isinstance(node, dict):
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)


def loosen_scalars(node):
    """Values Kubernetes accepts as either strings or numbers (IntOrString, Quantity)."""
    if isinstance(node, dict):
        if node.get("format") == "int-or-string" or node.get("x-kubernetes-int-or-string"):
            for k in ("type", "format"):
                node.pop(k, None)
            node["oneOf"] = [{"type": "string"}, {"type": "integer"}]
        for v in list(node.values()):
            loosen_scalars(v)
    elif isinstance(node, list):
        for v in node:
            loosen_scalars(v)


def main():
    src, out = sys.argv[1], sys.argv[2]
    with open(src) as f:
        doc = json.load(f)
    defs = doc.get("definitions", {})
    for name in (
        "io.k8s.apimachinery.pkg.api.resource.Quantity",
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
    ):
        if name in defs:
            desc = defs[name].get("description", "")
            defs[name] = {"description": desc, "oneOf": [{"type": "string"}, {"type": "number"}]}
    # A CRD's own schema (JSONSchemaProps) has properties named "$ref" and "$schema", which JSON
    # Schema compilers take for keywords; accept any object there (the server dry-run checks it).
    props = "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.JSONSchemaProps"
    if props in defs:
        defs[props] = {"description": defs[props].get("description", ""), "type": "object"}
    os.makedirs(out, exist_ok=True)
    written = 0
    for name, schema in defs.items():
        for gvk in schema.get("x-kubernetes-group-version-kind", []):
            kind, group, version = gvk["kind"], gvk.get("group", ""), gvk["version"]
            s = copy.deepcopy(schema)
            s["definitions"] = {
                n: copy.deepcopy(defs[n]) for n in closure(defs, name) if n != name
            }
            # kind and apiVersion must be the ones this file is for.
            props = s.setdefault("properties", {})
            props["kind"] = {"type": "string", "enum": [kind]}
            api_version = f"{group}/{version}" if group else version
            props["apiVersion"] = {"type": "string", "enum": [api_version]}
            loosen_scalars(s)
            strict(s)
            s["$schema"] = "http://json-schema.org/draft-04/schema#"
            path = os.path.join(out, f"{kind.lower()}{kind_suffix(group, version)}.json")
            with open(path, "w") as f:
                json.dump(s, f)
            written += 1
    print(f"wrote {written} schemas to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
