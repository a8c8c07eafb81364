"""The one password mask: everything psydef prints, raises or logs about a store, storage or model URI
goes through :func:`redact_uri`. No MLflow: the calibration storage and the tracking code both use it."""
import re

# A URI's password: SQLAlchemy's grammar (the user has no ':' or '/', the password runs to the next '@'),
# and the value of a query parameter whose name says it holds a secret. Whitespace ends a URI in a message.
_USERINFO_PASSWORD = re.compile(r"(\b[A-Za-z][\w+.-]*://[^:/@\s]*):[^@\s]*@")
_SECRET_QUERY = re.compile(r"([?&;][^=&;#\s]*(?:pass|pwd|token|secret|credential|key|auth)[^=&;#\s]*=)[^&;#\s]*",
                           re.IGNORECASE)
MASK = "***"


def redact_uri(text: str) -> str:
    """``text`` (a URI, or a message holding URIs) with every password masked: ``user:PASSWORD@`` ->
    ``user:***@`` and ``?password=X`` (``pwd``, ``token``, ``secret``, ``sslpassword``, ...) -> ``?password=***``.
    Everything psydef prints, raises or logs about a store, storage or model URI goes through it."""
    return _SECRET_QUERY.sub(rf"\1{MASK}", _USERINFO_PASSWORD.sub(rf"\1:{MASK}@", str(text)))
