"""From decoded words to a caption sentence and accessible alt text (WAI alt decision tree, WebAIM)."""
import re

SOFT_LIMIT = 125  # characters; screen readers do not cut here, but alt text is read in one breath
HARD_LIMIT = 250

_PREAMBLE = re.compile(
    r"^\s*(?:an?\s+|the\s+)?(?:close-?up\s+)?(?:image|picture|photo|photograph|graphic|snapshot|pic)\s+(?:of|showing|shows)\s+",
    re.IGNORECASE,
)
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?'])")


def sentence(words: list[str]) -> str:
    """['a', 'dog', 'runs'] -> 'A dog runs.': joined, tidied, capitalised, one final period."""
    text = " ".join(w for w in words if w.strip())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = re.sub(r"\s+", " ", text).strip(" ,;:")
    if not text:
        return ""
    text = text[0].upper() + text[1:]
    return text.rstrip(".!?") + "."


def alt_text(caption: str, limit: int = SOFT_LIMIT) -> str:
    """Caption sentence -> alt text: no "image of", capitalised, final period, at most `limit` chars.

    A caption longer than `limit` is cut at the last clause or word boundary that fits.
    """
    assert 0 < limit <= HARD_LIMIT, f"limit must be in 1..{HARD_LIMIT}"
    text = caption.strip()
    while True:
        stripped = _PREAMBLE.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    text = sentence(text.rstrip(".!?").split())
    if len(text) <= limit:
        return text
    body = text[: limit - 1]  # room for the final period
    cut = max(body.rfind(","), body.rfind(" "))
    if cut > 0:
        body = body[:cut]
    return sentence(body.rstrip(" ,;:").split())
