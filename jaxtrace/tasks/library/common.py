"""What the task modules share: reading the public data files (UTF-8 text, line pairs, dataset folders), the
reference's pronouns, and parsers and checks for task options."""

import codecs
import math
from pathlib import Path

from jaxtrace.tasks.pairs import PathLike

# The pronouns the reference substitutes into every attention example, possessive or not.
REFERENCE_PRONOUNS = ("she", "he")


def dataset_dir(data: PathLike, name: str) -> Path:
    """``data/name`` when ``data`` is the root holding the dataset folders, else ``data`` itself."""
    data = Path(data)
    return data / name if (data / name).is_dir() else data


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents, without the byte-order mark some editors write first; bytes that are not UTF-8
    are a ValueError naming the file, line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})") from None


def read_lines(path: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file, stripped, with their 1-based line numbers."""
    lines = read_text(path).splitlines()
    return [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]


def in_pairs(path: Path, rows: list[tuple[int, str]]) -> list[tuple[tuple[int, str], tuple[int, str]]]:
    """Consecutive rows grouped two by two; an odd count is an error."""
    if len(rows) % 2:
        raise ValueError(f"{path}: expected rows in consecutive pairs, got an odd number ({len(rows)})")
    return list(zip(rows[0::2], rows[1::2]))



def int_range(text: str) -> tuple[int, int]:
    """"10-99" -> (10, 99)."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"expected a range LOW-HIGH such as 10-99, got {text!r}") from None


def comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_positive(options, *names: str) -> None:
    """Each named option (None allowed) is >= 1."""
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be >= 1, got {value}")


def check_non_negative(options, *names: str) -> None:
    """Each named option (None allowed) is a finite number >= 0."""
    for name in names:
        value = getattr(options, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag(name)} must be a finite number >= 0, got {value}")
