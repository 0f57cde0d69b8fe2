"""Field types and caps of the public contract: printable text, OS-valid paths, strict models.

Caps on what a spec may hold keep validating the largest accepted spec to milliseconds.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

# Caps on what a spec may hold. Paths follow the OS (Linux PATH_MAX counts the final NUL; NAME_MAX per name);
# the list caps are far above any real job and keep validating the largest accepted spec to milliseconds.
PATH_MAX_BYTES = 4095
NAME_MAX_BYTES = 255
MAX_EVAL_FILES = 32  # per evaluation list
MAX_LIMITS = 96
MAX_LORA_TARGETS = 64
MAX_NAME_CHARS = 255  # revisions, module names, evaluation-set stems
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAYBE_LONG_NAME = re.compile(f"[^/]{{{NAME_MAX_BYTES // 4 + 1},}}")  # shorter names fit in UTF-8's 4 bytes a char


def _text(v: str) -> str:
    """Printable Unicode only: a NUL, newline or unpaired surrogate breaks paths, logs and the job store."""
    if not v.isprintable() and _CONTROL.search(v):  # isprintable: a fast pass for almost every string
        raise ValueError("must not contain control characters (NUL, newline, tab, ...)")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds an unpaired surrogate)") from None
    return v


def check_path(v: str) -> str:
    """A path (or hub id) the OS can take: at most PATH_MAX bytes, each name at most NAME_MAX bytes."""
    _text(v)
    size = len(v.encode("utf-8"))
    if size > PATH_MAX_BYTES:
        raise ValueError(f"path is {size} bytes long; the limit is {PATH_MAX_BYTES} bytes")
    for name in _MAYBE_LONG_NAME.findall(v):
        if (n := len(name.encode("utf-8"))) > NAME_MAX_BYTES:
            raise ValueError(f"a name in the path is {n} bytes long; the limit is {NAME_MAX_BYTES} bytes per name")
    return v


class FieldError(ValueError):
    """A rule's failure that names its field itself, as a dotted path from the spec's top (such as
    ``evaluation.limits.<key>``, which no pattern over the message could find): the API's 422 names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def looks_local(model_ref: str) -> bool:
    """Whether ``model.id`` (or ``model.dense``) names a local path rather than a hub id: absolute, ``./``/``../``/``~``
    paths and ``.gguf`` files are local; anything else is a hub id (the schema and the worker's loader share it).

    A bare relative name such as ``org/name`` is never looked up on disk, even when it happens to exist
    relative to the worker's directory: in the service that would load files outside the allowed roots.
    (`restorelcc run` turns relative paths that exist into absolute ones before it gets here.)
    """
    ref = model_ref.strip()
    return ref.startswith(("/", ".", "~")) or ref.lower().endswith(".gguf")


Text = Annotated[str, Field(max_length=MAX_NAME_CHARS), AfterValidator(_text)]
PathText = Annotated[str, Field(min_length=1, max_length=PATH_MAX_BYTES), AfterValidator(check_path)]


class Strict(BaseModel):
    # No inf/nan (JSON's 1e999): stored as JSON they would come back as null.
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


def check_http_url(v: str) -> str:
    """An absolute http(s) URL with a host, no credentials and no fragment (which hosts may be called is the
    service's allow-list, checked at submit: app.webhooks.urls)."""
    from urllib.parse import urlsplit

    _text(v)
    try:
        u = urlsplit(v)
        port = u.port
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError("must be an absolute http:// or https:// URL")
    if u.username is not None or u.password is not None:
        raise ValueError("must not carry credentials (user:password@)")
    if u.fragment:
        raise ValueError("must not have a #fragment")
    del port
    return v


def check_s3_uri(v: str) -> str:
    """``s3://bucket/prefix``: a valid bucket name and a prefix without empty, '.' or '..' parts."""
    _text(v)
    if not v.startswith("s3://"):
        raise ValueError("must be an S3 URI such as 's3://bucket/models/'")
    bucket, _, prefix = v[5:].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"'{bucket}' is not a valid S3 bucket name")
    parts = [p for p in prefix.split("/")]
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("the prefix must not have empty, '.' or '..' parts")
    return v
