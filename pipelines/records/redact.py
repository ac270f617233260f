"""Masking credentials in URIs before any text leaves the process.

Why: tracking and storage URIs may carry ``user:password@`` (or ``?token=...``); messages on the
terminal, MLflow params and tags are read by others and kept forever, so the secret part is
replaced by ``***`` wherever such a URI appears in text, whatever the scheme.
"""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<secret>[^/\s@]+)@")
_TOKEN_USER = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<secret>[^/\s:@]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|token|access_token|secret|api_key|apikey|key|sig|signature)=)[^&\s#]+",
    re.IGNORECASE,
)
MASK = "***"


def redact(text: str) -> str:
    """``http://user:pw@host`` -> ``http://user:***@host``; ``https://TOKEN@host`` -> ``https://***@host``;
    ``?token=abc`` -> ``?token=***``."""
    if not isinstance(text, str) or "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _TOKEN_USER.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m['key']}{MASK}", text)
