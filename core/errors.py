"""One exception hierarchy. Each class has a stable `code`; the same codes are stored on failed
jobs, shown by the CLI and sent in the API's one JSON error shape. HTTP statuses live in
api/errors.py only: core knows nothing of HTTP."""


class CaptioningError(Exception):
    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # a finer code within the class, e.g. invalid_image -> image_too_large


class ConfigError(CaptioningError):
    code = "config_error"


class InvalidRequest(CaptioningError):
    """The caller sent something malformed (bad JSON, missing field, bad S3 location)."""
    code = "invalid_request"


class Unauthenticated(CaptioningError):
    """No API key, or one that is unknown or revoked."""
    code = "unauthenticated"


class AccessDenied(CaptioningError):
    """The caller may not do this: an S3 bucket the service or the tenant may not read, a scope the
    API key lacks."""
    code = "access_denied"


class NotFound(CaptioningError):
    code = "not_found"


class Conflict(CaptioningError):
    """The request is well formed but the resource is not in a state that allows it yet."""
    code = "conflict"


class InvalidImage(CaptioningError):
    """The bytes are not an image we can caption; never retried, fails that image only."""
    code = "invalid_image"


class TooLarge(CaptioningError):
    code = "too_large"


class TransientError(CaptioningError):
    """A dependency (database, broker, S3) is unreachable for now: the only error worth retrying."""
    code = "unavailable"
