#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.py needs on a GPU machine that has no network and its
# own CUDA build of torch (Python 3.12, manylinux x86-64; torch, transformers, accelerate, numpy,
# pandas and matplotlib assumed present). Run it beforehand, on a machine with package-registry
# access, from a checkout whose virtual environment has '.[dev]' installed: the packages and their
# versions are that environment's (the set the tests pass with), minus what the GPU machine has.
#
#   benchmarks/gpu_wheels.sh DIR [--budget-mb 60] [--have FILE]
#
# Groups, in priority order. core is always downloaded (nothing runs without it; the script says
# when it alone exceeds the budget); an extra group that would take the folder over the budget is
# skipped whole and named in DIR/manifest.json (gpu_check.py --wheels DIR reports it, and skips
# the steps that need it):
#   core         the engine's imports: deap, tinydb, rich, psutil, safetensors (the MAP-Elites grid no
#                longer needs pyribs, numba or llvmlite)
#   suites       scikit-learn and scipy (cls-suite's digits task; not needed by the GPU steps)
#   dpo          trl, datasets, pyarrow and their needs (the dpo steps)
#   transformers the pinned transformers and its hub/tokenizers versions (used only when the
#                machine's transformers differs from the pin)
#   ray          ray and its needs (the ray-run step)
#   llm          the openai and anthropic clients (not needed by the check; the LLM operators)
# --have FILE: `pip freeze` of the GPU machine (or one package name a line): those are left out.
# Never torch or its CUDA libraries: the machine's own build is what the check measures.
set -euo pipefail

usage() { echo "usage: $0 DIR [--budget-mb MB] [--have FILE]" >&2; exit 2; }
[ $# -ge 1 ] || usage
DIR=$1; shift
BUDGET_MB=60
HAVE=""
while [ $# -gt 0 ]; do
    case $1 in
        --budget-mb) BUDGET_MB=$2; shift 2 ;;
        --have) HAVE=$2; shift 2 ;;
        *) usage ;;
    esac
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PYTHON" ] || { echo "error: $PYTHON not found; set PYTHON to an interpreter with '.[dev]' installed" >&2; exit 2; }
mkdir -p "$DIR"
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT

# name==version per group, from the installed metadata: each group's dependency closure minus
# what the GPU machine brings (torch, transformers, accelerate, numpy, pandas, matplotlib and
# their closures), minus --have.
"$PYTHON" - "$HAVE" > "$STAGE/groups" <<'EOF'
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement

def norm(name): return re.sub(r"[-_.]+", "-", name).lower()

def closure(roots, stop=()):
    seen, stack = {}, [norm(r) for r in roots]
    while stack:
        name = stack.pop()
        if name in seen or name in stop:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            sys.exit(f"error: {name} is not installed in this environment; pip install -e '.[dev]' first")
        seen[name] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.12",
                                                          "sys_platform": "linux", "platform_system": "Linux"}):
                stack.append(norm(req.name))
    return seen

machine = closure(["torch", "transformers", "accelerate", "numpy", "pandas", "matplotlib"])
have = set()
if sys.argv[1]:
    for line in open(sys.argv[1]):
        line = line.strip()
        if line and not line.startswith("#"):
            have.add(norm(re.split(r"[=<>@ ;]", line, maxsplit=1)[0]))
transformers_pin = {k: v for k, v in closure(["transformers"]).items() if k not in ("numpy", "packaging", "pyyaml",
                                                                                     "tqdm", "filelock", "fsspec",
                                                                                     "typing-extensions")}
groups = [
    ("core", closure(["deap", "tinydb", "rich", "psutil", "safetensors"], set(machine))),
    ("dpo", closure(["trl", "datasets"], set(machine))),
    ("transformers", transformers_pin),
    ("ray", closure(["ray"], set(machine))),
    ("suites", closure(["scikit-learn"], set(machine))),
    ("llm", closure(["openai", "anthropic"], set(machine))),
]
taken = set()
for group, packages in groups:
    specs = [f"{n}=={v}" for n, v in sorted(packages.items())
             if n not in taken and n not in have and not re.match(r"torch$|triton$|nvidia-", n)]
    taken.update(packages)
    print(group, " ".join(specs))
EOF

total=0
budget=$((BUDGET_MB * 1024 * 1024))
included=()
skipped_json=()
groups_json=()
over=false
while read -r group specs; do
    [ -n "$specs" ] || { echo "$group: nothing to download (all present)"; continue; }
    mkdir -p "$STAGE/$group"
    # shellcheck disable=SC2086
    python_tags="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none"
    platforms="--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64"
    platforms="$platforms --platform manylinux_2_28_x86_64 --platform any"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --quiet --no-deps $python_tags $platforms -d "$STAGE/$group" $specs
    size=$(du -cb "$STAGE/$group"/*.whl | tail -1 | cut -f1)
    mb=$(awk "BEGIN { printf \"%.1f\", $size / 1048576 }")
    if [ $((total + size)) -le $budget ] || [ "$group" = core ]; then
        if [ $((total + size)) -gt $budget ]; then
            over=true
            echo "warning: core alone takes $mb MB, over the $BUDGET_MB MB budget (numba's llvmlite and scipy are most" \
                 "of it); pass --have FILE with the GPU machine's pip freeze to leave out what it has" >&2
        fi
        files=$(cd "$STAGE/$group" && ls *.whl | sed 's/.*/"&"/' | paste -sd, -)
        groups_json+=("\"$group\": [$files]")
        mv "$STAGE/$group"/*.whl "$DIR/"
        total=$((total + size))
        included+=("\"$group\"")
        echo "$group: $mb MB ($(echo "$specs" | wc -w) wheels)"
    else
        skipped_json+=("{\"group\": \"$group\", \"mb\": $mb, \"packages\": \"$specs\"}")
        echo "$group: SKIPPED to stay under $BUDGET_MB MB (it takes $mb MB; $(awk "BEGIN { printf \"%.1f\", $total / 1048576 }") MB used)"
    fi
done < "$STAGE/groups"

join() { local IFS=,; echo "$*"; }
cat > "$DIR/manifest.json" <<EOF
{"budget_mb": $BUDGET_MB, "total_mb": $(awk "BEGIN { printf \"%.1f\", $total / 1048576 }"), "over_budget": $over,
 "python": "3.12", "included": [$(join "${included[@]+"${included[@]}"}")],
 "groups": {$(join "${groups_json[@]+"${groups_json[@]}"}")},
 "skipped": [$(join "${skipped_json[@]+"${skipped_json[@]}"}")]}
EOF
echo "$(awk "BEGIN { printf \"%.1f\", $total / 1048576 }") MB in $DIR (budget $BUDGET_MB MB); manifest: $DIR/manifest.json"
