#!/usr/bin/env python3
"""Checks that deploy/Dockerfile.dockerignore leaves everything the build needs in the
build context (the repo root) and keeps build output and VCS data out.

It computes the context with docker-py's implementation of the .dockerignore rules (no
Docker engine needed) and checks that it holds Cargo.toml, Cargo.lock, every workspace
member's manifest and sources, and every file a crate embeds with include_str!/include_bytes!
(e.g. tandem-gateway's clients/js/src/tandem.js); and that it holds no target/ or .git/.

Usage: python3 deploy/checks/docker_context.py
Exit 0 = pass, 1 = fail, 77 = the `docker` Python package is missing.
"""

import glob
import re
import sys
from pathlib import Path

try:
    import tomllib  # Python 3.11+
    from docker.utils.build import exclude_paths
except ImportError as e:
    print(f"  context: SKIP: {e} (needs Python 3.11+ and `pip install docker`)")
    sys.exit(77)

REPO = Path(__file__).resolve().parents[2]
IGNORE = REPO / "deploy" / "Dockerfile.dockerignore"

patterns = [
    line.strip()
    for line in IGNORE.read_text().splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]
context = set(exclude_paths(str(REPO), patterns))
failures = []


def need(rel, why):
    if rel not in context:
        failures.append(f"{rel} ({why}) is not in the build context")


need("Cargo.toml", "workspace manifest")
need("Cargo.lock", "cargo build --locked")
workspace = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]
members = sorted(
    {
        str(Path(m).relative_to(REPO))
        for pattern in workspace.get("members", [])
        for m in glob.glob(str(REPO / pattern))
        if (Path(m) / "Cargo.toml").is_file()
    }
)
embedded = 0
for member in members:
    need(f"{member}/Cargo.toml", "workspace member")
    for src in (REPO / member).rglob("*.rs"):
        rel_src = str(src.relative_to(REPO))
        if "/target/" in f"/{rel_src}":
            continue
        need(rel_src, "source")
        for m in re.finditer(r'include_(?:str|bytes)!\(\s*"([^"]+)"\s*\)', src.read_text()):
            target = (src.parent / m.group(1)).resolve()
            if target.is_file():
                embedded += 1
                need(str(target.relative_to(REPO)), f"embedded by {rel_src}")
leaks = sorted(p for p in context if re.search(r"(^|/)(target|\.git|node_modules)(/|$)", p))
if leaks:
    failures.append(f"build output / VCS data in the context: {leaks[:5]}")

if failures:
    for f in failures:
        print(f"  context: FAIL: {f}")
    sys.exit(1)
files = sum(1 for p in context if (REPO / p).is_file())
print(
    f"  context: PASS ({files} files; {len(members)} workspace members and {embedded} embedded files "
    "present; no target/, .git/, node_modules/)"
)
