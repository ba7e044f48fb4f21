"""What counts as a credential, shared by the engines and the packager.

It lives with the engines because a logged model carries `lm_engine/` (not the
packager) and an engine must drop credentials from its own settings.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Whole words of a setting's name (split at _, - and case changes), so that
# `api_key`, `aws_secret_access_key` and `X-Api-Key` match and `max_tokens` does not.
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials",
                "authorization", "auth", "cookie", "signature", "bearer"}


def is_secret_name(name: str) -> bool:
    words = re.split(r"[_\-\s.]+|(?<=[a-z])(?=[A-Z])", str(name))
    return any(word.lower() in SECRET_WORDS for word in words if word)


def clean_url(url: str) -> str:
    """A URL without user:password@ and without secret-named query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if not parts.scheme:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not is_secret_name(k)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
