"""Renders a chart with the real Helm v4 engine (helm-python-sdk) and validates every
rendered object with kubernetes-validate (the Kubernetes JSON schemas, strict: unknown
fields are errors) for each requested Kubernetes version.

Used by cli/tests/it/helm_real.rs and cli/tests/it/kind_values.rs. Input on stdin (JSON):
    {"chart": DIR, "name": RELEASE, "namespace": NS, "values": {...}, "versions": ["1.28", ...]}
Output on stdout (JSON):
    {"objects": [{"template": PATH, "object": {...}}], "errors": ["..."]}
A template that fails to render exits 2 with Helm's message on stderr.
"""

import json
import sys

import helm_python as helm
import kubernetes_validate
import yaml


class Loader(yaml.SafeLoader):
    """YAML 1.1 as Kubernetes reads it, but timestamps stay strings (JSON has no dates)."""


Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in Loader.yaml_implicit_resolvers.copy().items()
}


def main() -> int:
    req = json.load(sys.stdin)
    chart = helm.Chart.load(req["chart"])
    try:
        files = chart.render(
            req["values"], name=req["name"], namespace=req["namespace"], is_install=True
        )
    except helm.HelmError as e:
        print(str(e), file=sys.stderr)
        return 2
    objects = []
    for path in sorted(files):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.load_all(files[path], Loader=Loader):
            if doc:
                objects.append({"template": path, "object": doc})
    errors = []
    for o in objects:
        obj = o["object"]
        for version in req["versions"]:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = "/".join(str(p) for p in e.path)
                errors.append(
                    f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')} "
                    f"(Kubernetes {version}) at {where or '.'}: {e.message}"
                )
    json.dump({"objects": objects, "errors": errors}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
