"""Log lines as text or as one JSON object per line (CAPTIONER_LOG_FORMAT=json), for log shippers.

Context travels in the standard `extra=` mapping (image_id, job_id, batch_id, error_code...): the
JSON formatter writes every such field, the text formatter leaves them out."""
import json
import logging
from datetime import datetime, timezone

# attributes every LogRecord has; anything else on a record came from `extra=`
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def use_format(logger: logging.Logger, log_format: str) -> None:
    """Give every handler of `logger` the format; a logger without handlers gets a stderr one."""
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    for handler in logger.handlers:
        handler.setFormatter(formatter(log_format))
