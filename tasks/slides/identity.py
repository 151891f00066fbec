"""Slide ids that are safe to use as file names and S3 keys, and optional pseudonyms for them.

A slide id is born from a file name (its stem), and file names are whatever a scanner, a
person or a script wrote: unicode, spaces, `..`, backslashes, a patient's name. Every output
path and key is built from the id (`tiles/<id>.parquet`, `quarantine/<id>.json`, S3 keys...),
so ids are put on an allow-list before anything is written:

- `safe_slide_id(name)` keeps a name that is already on the list (`[A-Za-z0-9._-]`, starting
  with a letter or digit, no `..`, at most 128 characters) and maps any other to one that is:
  accents dropped, other characters replaced, plus 8 hex digits of a hash of the original name,
  so two names that clean to the same text still get different ids;
- `check_slide_id(id)` refuses an id off the list, for code that builds paths from ids;
- `path_under(root, *parts)` resolves a path and refuses one that leaves `root` (symlinks
  included).

Sites that must not expose patient identifiers in their outputs turn on pseudonymised ids: the
id becomes `p-` + a keyed hash (HMAC-SHA256) of the safe id, the same every night for the same
key, and unreadable without it. The key comes from the environment (`VADFLOW_PSEUDONYM_KEY`)
or a Prefect Secret block, never from a site file or a flow parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import unicodedata
from pathlib import Path

MAX_ID_LENGTH = 128
PSEUDONYM_KEY_ENV = "VADFLOW_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16
PSEUDONYM_PREFIX = "p-"
_ALLOWED = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9._-]+")


class UnsafeSlideIdError(ValueError):
    """A slide id (or a path built from one) that could escape its folder or break a key."""


class PseudonymKeyError(RuntimeError):
    """Pseudonymised ids were asked for, but no usable key was found."""


def is_safe_slide_id(slide_id: str) -> bool:
    return (
        len(slide_id) <= MAX_ID_LENGTH
        and _ALLOWED.fullmatch(slide_id) is not None
        and ".." not in slide_id
    )


def safe_slide_id(name: str) -> str:
    """`name` if it is on the allow-list, else a cleaned form of it plus a hash of the original."""
    if is_safe_slide_id(name):
        return name
    ascii_text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    cleaned = _NOT_ALLOWED.sub("_", ascii_text)
    cleaned = re.sub(r"\.{2,}", "_", cleaned).strip("._-")
    suffix = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    cleaned = cleaned[: MAX_ID_LENGTH - len(suffix) - 1].rstrip("._-") or "slide"
    return f"{cleaned}-{suffix}"


def check_slide_id(slide_id: str) -> str:
    """`slide_id` itself, or UnsafeSlideIdError naming it: for code that builds paths from ids."""
    if not is_safe_slide_id(slide_id):
        raise UnsafeSlideIdError(
            f"slide id {slide_id!r} is not a safe file name or key (allowed: letters, digits, "
            f"'.', '_', '-', starting with a letter or digit, no '..', at most {MAX_ID_LENGTH} "
            "characters); ids come from tasks.slides.identity.safe_slide_id"
        )
    return slide_id


def path_under(root: str | Path, *parts: str) -> Path:
    """`root/parts...` resolved (symlinks followed), or UnsafeSlideIdError if it leaves `root`."""
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if not target.is_relative_to(base):
        raise UnsafeSlideIdError(
            f"{Path(root).joinpath(*parts)} resolves to {target}, outside {base}"
        )
    return target


def pseudonym_key(secret_block: str | None = None) -> bytes:
    """The pseudonym key: `$VADFLOW_PSEUDONYM_KEY`, else the Prefect Secret block `secret_block`.

    The key is never logged, stored with the outputs or passed as a flow parameter; only the
    block's name travels. At least 16 bytes, so the pseudonyms cannot be brute-forced from a
    list of likely file names.
    """
    value: str | None = os.environ.get(PSEUDONYM_KEY_ENV) or None
    where = f"${PSEUDONYM_KEY_ENV}"
    if value is None and secret_block:
        from prefect.blocks.system import Secret

        try:
            secret = Secret.load(secret_block).get()
        except ValueError as exc:  # Prefect's "block document not found"
            raise PseudonymKeyError(
                f"pseudonymised slide ids need a key, but the Prefect Secret block "
                f"{secret_block!r} cannot be loaded ({exc}); create it or set ${PSEUDONYM_KEY_ENV}"
            ) from None
        value = secret if isinstance(secret, str) else None
        where = f"the Prefect Secret block {secret_block!r}"
    if value is None:
        raise PseudonymKeyError(
            f"pseudonymised slide ids need a key: set ${PSEUDONYM_KEY_ENV} or name a Prefect "
            "Secret block holding it"
        )
    key = value.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise PseudonymKeyError(
            f"the pseudonym key in {where} is {len(key)} bytes; use at least {MIN_KEY_BYTES} "
            "random bytes (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
        )
    return key


def pseudonymise(slide_id: str, key: bytes) -> str:
    """A stable, keyed pseudonym for a slide id: `p-` + 20 hex digits of HMAC-SHA256."""
    digest = hmac.new(key, slide_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{PSEUDONYM_PREFIX}{digest[:20]}"
