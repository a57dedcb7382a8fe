"""Stage fetch-gtsrb: the three official GTSRB archives into data/raw/.

Downloads stream with a progress bar, retry transient network errors with back-off, and
are verified against the md5 in params.yaml. Everything lands in a temporary directory
that replaces data/raw/ only when all three archives are verified, so a failure leaves
the previous archives as they were. ``fetch.source: synthetic`` generates archives of
the same names and layout locally instead (see gtsrb.synthetic).
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from gtsrb import synthetic
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import atomic_dir
from gtsrb.params import Archive, FetchParams

log = logging.getLogger(__name__)

CHUNK = 1 << 20
HINT = (
    "use a mirror with `dvc exp run -S fetch.url=<mirror-url>` or work offline with "
    "`dvc exp run -S fetch.source=synthetic`"
)


class _Transient(Exception):
    """A network failure worth retrying (connection reset, timeout, 5xx, short read)."""


def archive_url(base: str, name: str) -> str:
    return urllib.parse.urljoin(base if base.endswith("/") else base + "/", name)


def _download_once(url: str, dest: Path, timeout: float) -> str:
    """Stream ``url`` into ``dest``; return its md5. Raise _Transient or GtsrbError."""
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total and total.isdigit() else None
            done = 0
            with (
                open(dest, "wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=None,
                    leave=False,
                ) as bar,
            ):
                while block := resp.read(CHUNK):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    bar.update(len(block))
            if total is not None and done != total:
                raise _Transient(f"connection closed after {done} of {total} bytes")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from exc
        raise GtsrbError(
            f"HTTP {exc.code} {exc.reason} for {url}: check fetch.url and the archive names "
            f"under fetch.archives in params.yaml, or {HINT}"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, FileNotFoundError):  # a file:// mirror: nothing to retry
            raise GtsrbError(f"{url}: no such file; check fetch.url in params.yaml") from None
        raise _Transient(str(reason) or type(exc).__name__) from exc
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, retries: int, timeout: float, backoff: float = 1.0) -> None:
    """Download ``url`` to ``dest`` and check its md5, retrying transient failures."""
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            actual = _download_once(url, dest, timeout)
            break
        except _Transient as exc:
            dest.unlink(missing_ok=True)
            if attempt == attempts:
                raise GtsrbError(
                    f"could not download {url} after {attempts} attempt(s): {exc}; {HINT}"
                ) from None
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: %s; retrying in %.0fs (%d/%d)", url, exc, wait, attempt, retries)
            time.sleep(wait)
    if actual != md5.lower():
        raise GtsrbError(
            f"md5 mismatch for {dest.name} downloaded from {url}: expected {md5.lower()}, "
            f"got {actual}; the server sent a different file (or a corrupt one): "
            f"check fetch.url and fetch.archives in params.yaml"
        )
    log.info("%s: md5 %s verified", dest.name, actual)


def fetch(params: FetchParams, out_dir: str | Path = "data/raw", backoff: float = 1.0) -> list[Path]:
    """Fill ``out_dir`` with the three archives named in params (all or nothing)."""
    out_dir = Path(out_dir)
    archives: list[Archive] = params.archives.all()
    with atomic_dir(out_dir) as tmp:
        if params.source == "synthetic":
            synthetic.write_archives(tmp, params.archives, params.synthetic)
        else:
            for archive in archives:
                url = archive_url(params.url, archive.name)
                log.info("downloading %s", url)
                download(url, tmp / archive.name, archive.md5, params.retries, params.timeout, backoff)
    return [out_dir / a.name for a in archives]
