"""The pull-request report: what CI posts on every PR, built from two git revisions.

``gtsrb ci-report --base origin/main`` writes one markdown comment: the metrics and params
diffs (``dvc metrics diff`` / ``dvc params diff``, rows sorted so the comment is stable), the
backend comparison of ``reports/compare.md``, and the training curves of base and head as
mermaid charts (GitHub renders them; nothing to host). ``gtsrb ci-comment`` posts it on the
PR, or updates the one comment it posted before (found by a hidden marker), so a PR never
collects duplicates. Without a token (PRs from forks) it goes to the job summary instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from gtsrb.errors import GtsrbError

MARKER = "<!-- gtsrb-ci-report -->"
CURVES = {  # title: (dvclive TSV, y axis)
    "Validation accuracy, whole images": ("metrics/train/plots/metrics/val/accuracy/whole.tsv", "accuracy"),
    "Training loss": ("metrics/train/plots/metrics/train/loss.tsv", "loss"),
}
ERRORS = "reports/test-openblas/errors.md"  # error_report.py's page of the baseline's test stage


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GtsrbError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def sorted_table(md: str) -> tuple[list[str], list[str]]:
    """A markdown table's header lines and its rows, sorted (DVC's row order is not stable)."""
    lines = [line for line in md.strip().splitlines() if line.startswith("|")]
    return lines[:2], sorted(lines[2:])


def _table(header: list[str], rows: list[str]) -> str:
    return "\n".join([*header, *rows])


def _curve(repo: Path, rev: str | None, path: str) -> list[float]:
    """One column of a dvclive TSV at ``rev`` (None: the working tree); [] if absent."""
    if rev is None:
        file = repo / path
        text = file.read_text() if file.is_file() else ""
    else:
        proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True)
        text = proc.stdout if proc.returncode == 0 else ""
    rows = [line.split("\t") for line in text.strip().splitlines()[1:] if line.strip()]
    return [round(float(r[-1]), 4) for r in rows]


def mermaid_chart(title: str, axis: str, base: list[float], head: list[float]) -> str:
    n = max(len(base), len(head))
    top = max([*base, *head, 0.0])
    upper = 1.0 if top <= 1.0 else round(top * 1.1, 2)
    lines = [
        "```mermaid",
        "xychart-beta",
        f'    title "{title}"',
        f'    x-axis "epoch" [{", ".join(str(i) for i in range(1, n + 1))}]',
        f'    y-axis "{axis}" 0 --> {upper}',
    ]
    lines += [f"    line [{', '.join(map(str, series))}]" for series in (base, head) if series]
    return "\n".join([*lines, "```"])


def build_report(repo: str | Path, base: str, head_label: str = "this PR") -> str:
    """The PR comment comparing the working tree (head) with ``base``."""
    repo = Path(repo)
    metrics_md = _run(["dvc", "metrics", "diff", base, "--md"], repo)
    params_md = _run(["dvc", "params", "diff", base, "--md"], repo)
    out = [MARKER, f"## GTSRB pipeline: {head_label} vs `{base}`", ""]
    header, rows = sorted_table(metrics_md)  # headline figures only: short enough to show whole
    out += ["### Metrics", ""]
    out += [_table(header, rows) if rows else "No metric changed.", ""]
    header, rows = sorted_table(params_md)
    out += ["### Params", "", _table(header, rows) if rows else "No parameter changed.", ""]
    compare = repo / "reports" / "compare.md"
    out += ["### Runtimes", ""]
    if compare.is_file():
        body = "\n".join(line for line in compare.read_text().splitlines() if not line.startswith("# "))
        out += [body.strip(), ""]
    else:
        out += ["No comparison: the test stages did not run.", ""]
    errors = repo / ERRORS
    if errors.is_file():  # its framing table and the classes most confused on whole images
        page = errors.read_text().split("\n## ")
        whole = next((part for part in page if part.startswith("Most confused classes, whole")), "")
        out += ["### Errors", "", page[0].split("\n", 2)[-1].strip(), ""]
        if whole:
            out += ["Most confused on whole images:", "", whole.split("\n", 1)[1].strip(), ""]
        out += [f"Misclassified test images: `{ERRORS.replace('.md', '.png')}` (`dvc plots show`).", ""]
    out += ["### Training curves", ""]
    for title, (path, axis) in CURVES.items():
        base_curve, head_curve = _curve(repo, base, path), _curve(repo, None, path)
        if not head_curve and not base_curve:
            continue
        legend = (
            "first line: base, second: head"
            if base_curve and head_curve
            else ("head only: the base has no training curves yet" if head_curve else "base only")
        )
        out += [f"**{title}** ({legend})", "", mermaid_chart(title, axis, base_curve, head_curve), ""]
    return "\n".join(out).rstrip() + "\n"


def _api(method: str, url: str, token: str, payload: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(
        url,
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.github+json",
            "X-GitHub-Api-Version": "2022-11-28",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null"), resp.headers.get("Link", "")
    except urllib.error.HTTPError as exc:
        raise GtsrbError(f"GitHub API {method} {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise GtsrbError(f"GitHub API {method} {url}: {exc.reason}") from None


def post_comment(body: str, repo: str, pr: int, token: str, api: str | None = None) -> str:
    """Create the report comment on PR ``pr``, or update the one that carries the marker."""
    api = (api or os.environ.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
    url = f"{api}/repos/{repo}/issues/{pr}/comments?per_page=100"
    while url:
        comments, link = _api("GET", url, token)
        for comment in comments:
            if MARKER in (comment.get("body") or ""):
                _api("PATCH", f"{api}/repos/{repo}/issues/comments/{comment['id']}", token, {"body": body})
                return f"updated comment {comment['id']}"
        url = next((part.split(";")[0].strip(" <>") for part in link.split(",") if 'rel="next"' in part), "")
    created, _ = _api("POST", f"{api}/repos/{repo}/issues/{pr}/comments", token, {"body": body})
    return f"created comment {created['id']}"


def publish(body: str, repo: str | None, pr: int | None, token: str | None) -> str:
    """Post on the PR when there is a token; always add the report to the job summary."""
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write(body)
    if token and repo and pr:
        return post_comment(body, repo, pr, token)
    return "no token (a fork?): report written to the job summary only"
