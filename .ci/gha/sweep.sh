#!/usr/bin/env bash
# Sweeps on Arm runners (.github/workflows/sweep.yml): one `dvc exp run` per cell of a grid of
# `-S` overrides, each pushed to the git remote with its outputs on the DVC remote, so that
# `dvc exp pull origin` + `dvc exp show` compare them anywhere.
#
#   sweep.sh matrix  OVERRIDES -> the matrix JSON, one line: {"include": [{"name", "overrides"}, ...]}
#       OVERRIDES: override sets separated by newlines or ';'. A set is PARAM=VALUE[,VALUE...]
#       words separated by spaces and stands for the cross product of its values, as
#       `dvc exp run -S` takes them (commas inside [...] belong to a list value); the matrix is
#       every set's cells, in order, without repeats. NAME_PREFIX (default sweep) and SWEEP_ID
#       (the workflow run) name the cells PREFIX-ID-1, -2... Input it cannot parse fails here.
#   sweep.sh check   OVERRIDES -> validate one cell against params.yaml and the stages' own checks
#   sweep.sh run     OVERRIDES NAME [TARGET] -> check, `dvc exp run --pull -n NAME -S ... [TARGET]`,
#                    then push
#   sweep.sh push    NAME -> `dvc exp push GIT_REMOTE NAME` (default origin): the experiment's
#       commit to the git remote, its outputs to the DVC remote. With GITHUB_TOKEN the token
#       goes to this push only, as an http.extraheader in a temporary git config file
#       (the checkout keeps no credentials: persist-credentials: false).
# Values come from the environment (the workflow passes inputs and matrix values through env:).
set -euo pipefail
cd "$(dirname "$0")/../.."

die() {
    echo "sweep: $*" >&2
    exit 2
}

matrix() {
    python3 - <<'PY'
import itertools, json, os, re, sys

KEY = re.compile(r"[A-Za-z_]\w*(\.\w+)+")
MAX_JOBS = 256  # GitHub's limit per matrix


def fail(message):
    sys.exit(f"sweep: {message}")


def split_values(word, value):
    """Split on commas outside brackets and quotes: 0.1,0.2 -> 2 values; [1,64],[8] -> 2 lists."""
    values, depth, quote, current = [], 0, None, ""
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
            if depth < 0:
                fail(f"{word!r}: unbalanced brackets")
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    if depth or quote:
        fail(f"{word!r}: unbalanced {'quotes' if quote else 'brackets'}")
    values.append(current)
    if not all(values):
        fail(f"{word!r}: empty value (PARAM=VALUE[,VALUE...])")
    return values


text = os.environ.get("OVERRIDES", "")
sets = [line.split() for line in re.split(r"[;\n]", text) if line.strip()]
if not sets:
    fail("no overrides given: one set per line or ';', e.g. 'train.lr=0.003,0.01 train.arch=micronnet'")
cells = []
for number, words in enumerate(sets, 1):
    axes = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep:
            fail(f"set {number}: {word!r} is not PARAM=VALUE[,VALUE...]")
        if not KEY.fullmatch(key):
            fail(f"set {number}: {key!r} is not a params.yaml key like train.lr")
        if key in axes:
            fail(f"set {number}: {key} is given twice")
        axes[key] = split_values(word, value)
    for combo in itertools.product(*axes.values()):
        cell = " ".join(f"{key}={value}" for key, value in zip(axes, combo))
        if cell not in cells:
            cells.append(cell)
if len(cells) > MAX_JOBS:
    fail(f"{len(cells)} experiments: GitHub runs at most {MAX_JOBS} jobs per matrix")
prefix = os.environ.get("NAME_PREFIX") or "sweep"
run_id = os.environ.get("SWEEP_ID") or "local"
if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", f"{prefix}-{run_id}"):
    fail(f"{prefix}-{run_id!r} cannot name an experiment (letters, digits, '.', '_', '-')")
include = [{"name": f"{prefix}-{run_id}-{i}", "overrides": cell} for i, cell in enumerate(cells, 1)]
print(json.dumps({"include": include}))
PY
}

check() {
    : "${OVERRIDES:?OVERRIDES must hold PARAM=VALUE words}"
    python3 - <<'PY'
"""Refuse a cell before any data is pulled: each word PARAM=VALUE, PARAM a key of params.yaml,
and the values, read as `dvc exp run -S` reads them, accepted by the stages' own validation."""
import os, shutil, sys, tempfile
from pathlib import Path

import yaml
from gtsrb import params as P
from gtsrb.errors import ParamsError


def apply(path, overrides):
    """Set the values in params.yaml at `path` exactly as `dvc exp run -S` will (hydra's typing)."""
    try:
        from dvc.utils.hydra import apply_overrides
    except ImportError:  # DVC moved it: YAML's reading of each value comes close
        data = yaml.safe_load(path.read_text())
        for key, _, value in (word.partition("=") for word in overrides):
            *parents, last = key.split(".")
            node = data
            for part in parents:
                node = node[part]
            node[last] = yaml.safe_load(value)
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return
    apply_overrides(path, overrides)


overrides = os.environ["OVERRIDES"].split()
try:
    raw = P.load_raw("params.yaml")
except ParamsError as exc:
    sys.exit(f"sweep: {exc}")
for word in overrides:
    key, sep, value = word.partition("=")
    if not sep or not key or not value:
        sys.exit(f"sweep: {word!r} is not PARAM=VALUE")
    node, path = raw, []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(node) if isinstance(node, dict) else "none, it is a value"
            where = ".".join(path) or "params.yaml"
            sys.exit(f"sweep: {key}: unknown param (keys of {where}: {known})")
        node, path = node[part], [*path, part]
    if isinstance(node, dict):
        sys.exit(f"sweep: {key}: is a section of params.yaml, not a param (keys: {', '.join(node)})")
with tempfile.TemporaryDirectory() as tmp:
    shutil.copy("params.yaml", Path(tmp, "params.yaml"))
    try:
        apply(Path(tmp, "params.yaml"), overrides)
    except Exception as exc:  # DVC's own message and its cause, e.g. hydra's parse error
        sys.exit(f"sweep: {' '.join(overrides)}: {exc} ({exc.__cause__ or 'no detail'})")
    os.chdir(tmp)
    try:
        for section in P.SECTIONS:
            P.load(section)
    except ParamsError as exc:
        sys.exit(f"sweep: {exc}")
print(f"sweep: {' '.join(overrides)}: valid")
PY
}

push() {
    local name=${NAME:?NAME must name the experiment} remote=${GIT_REMOTE:-origin}
    if [ -z "${GITHUB_TOKEN:-}" ]; then
        dvc exp push "$remote" "$name"
        return
    fi
    # DVC pushes through dulwich, which reads the global git config, not `git -c`: give it a
    # temporary one holding the user's settings plus the token, removed when this ends.
    local config
    config=$(mktemp)
    # shellcheck disable=SC2064 # expand now: the path is fixed
    trap "rm -f '$config'" EXIT
    if [ -f "$HOME/.gitconfig" ]; then cat "$HOME/.gitconfig" >"$config"; fi
    local auth
    auth=$(printf 'x-access-token:%s' "$GITHUB_TOKEN" | base64 -w0)
    git config --file "$config" "http.${GITHUB_SERVER_URL:-https://github.com}/.extraheader" \
        "AUTHORIZATION: basic $auth"
    GIT_CONFIG_GLOBAL=$config dvc exp push "$remote" "$name"
}

run() {
    local name=${NAME:?NAME must name the experiment} target=${TARGET:-}
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "$name: not a valid experiment name"
    [[ $target =~ ^[A-Za-z0-9_-]*$ ]] || die "$target: not a stage name"
    if [ "${GITHUB_ACTIONS:-}" = true ]; then
        # The checkout belongs to another user inside a job container.
        git config --global --add safe.directory "$PWD"
        git config user.name "github-actions[bot]"
        git config user.email "41898282+github-actions[bot]@users.noreply.github.com"
    fi
    if ! command -v gtsrb >/dev/null 2>&1; then
        # As stage.sh: keep the image's torch and numpy.
        python3 -m pip install --quiet --upgrade-strategy only-if-needed -e '.[pipeline]'
    fi
    check
    local words sets=() word
    read -r -a words <<<"$OVERRIDES" # split on blanks, no globbing: [1,64] stays a value
    for word in "${words[@]}"; do sets+=(-S "$word"); done
    local targets=()
    if [ -n "$target" ]; then targets=("$target"); fi
    dvc exp run --pull -n "$name" "${sets[@]}" "${targets[@]}"
    push
    if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
        # shellcheck disable=SC2016 # the backticks are Markdown
        printf 'Experiment `%s` (%s): `dvc exp pull origin %s`, then `dvc exp show`\n' \
            "$name" "$OVERRIDES" "$name" >>"$GITHUB_STEP_SUMMARY"
    fi
}

case ${1:-} in
matrix | check | run | push) "$1" ;;
*) die "usage: sweep.sh matrix|check|run|push (inputs from the environment; see the header)" ;;
esac
