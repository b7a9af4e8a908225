"""Validates every shipped Kubernetes manifest against the Kubernetes schemas (strict: unknown
fields are errors), for the oldest supported version (native sidecars: 1.29) and the newest
the validator ships. Kustomizations are checked for missing files, and each patch is validated
merged onto the base resource it patches. Run by `cargo xtask validate-manifests`, which
installs kubernetes-validate in a venv under target/.

Usage: python validate_manifests.py DEPLOY_DIR
"""

import copy
import fnmatch
import pathlib
import sys

import kubernetes_validate
import yaml

OLDEST_SUPPORTED = "1.29"
KUSTOMIZATION = "kustomization.yaml"


def documents(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def merge(base, patch):
    """A strategic-merge approximation good enough for our patches: maps merge, the rest
    replaces."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return patch


def key(resource):
    return (resource.get("kind"), resource.get("metadata", {}).get("name"))


def validate(resource, where, failures):
    versions = [OLDEST_SUPPORTED, kubernetes_validate.latest_version()]
    for version in versions:
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            failures.append(f"{where} ({version}): {path}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            failures.append(f"{where} ({version}): no schema: {error}")


def ignored_by_git(file):
    """Whether the .gitignore beside `file` names it: the certificates and keys a user creates
    (`sidecar certs`, or their own server certificate), never committed."""
    gitignore = file.parent / ".gitignore"
    if not gitignore.exists():
        return False
    patterns = [line.strip() for line in gitignore.read_text().splitlines()]
    return any(line and fnmatch.fnmatch(file.name, line) for line in patterns)


def check_kustomization(path, failures):
    """Every file a kustomization names exists (secrets the user creates excepted: listed in
    the .gitignore of their directory)."""
    (kustomization,) = documents(path)
    named = list(kustomization.get("resources", []))
    named += [p["path"] for p in kustomization.get("patches", [])]
    for generator in kustomization.get("secretGenerator", []):
        named += [f for f in generator.get("files", []) if not ignored_by_git(path.parent / f)]
    for name in named:
        if not (path.parent / name).exists():
            failures.append(f"{path}: names {name}, which does not exist")


def main(deploy_dir):
    root = pathlib.Path(deploy_dir) / "kubernetes"
    failures, resources, patches, checked = [], {}, [], 0
    for path in sorted(root.rglob("*.yaml")):
        if path.name == KUSTOMIZATION:
            check_kustomization(path, failures)
            continue
        for index, resource in enumerate(documents(path)):
            if "patches" in path.parts:
                patches.append((path, resource))
                continue
            validate(resource, f"{path} document {index + 1}", failures)
            resources.setdefault(key(resource), resource)
            checked += 1
    for path, patch in patches:
        base = resources.get(key(patch))
        if base is None:
            failures.append(f"{path}: patches {key(patch)}, which no manifest defines")
            continue
        validate(merge(copy.deepcopy(base), patch), f"{path} merged onto its base", failures)
        checked += 1
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"validate-manifests: {checked} resources checked, {len(failures)} failures")
    return 1 if failures or checked == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
