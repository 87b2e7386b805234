"""Fields of the frozen config dataclasses, with what the command line needs to offer them.

Every config the user sets (`SearchConfig`, `TaskSpec`, `ModelSpec`, `ObjectiveConfig`, `MeshSpec`) declares its
fields with `option`; `jaxtrace.cli` derives each command's flags from them, so every command takes the same options
with the same defaults, help and checks.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


def option(default: Any, help: str, *, choices: Sequence[str] | None = None, parse: Callable[[str], Any] | None = None,
           tasks: Sequence[str] | None = None, flag: str | None = None) -> Any:
    """A dataclass field with its command-line help. `parse` turns the flag's text into the value (default: the
    type of the default); `tasks` lists the tasks the option applies to (task options only); `flag` overrides the
    flag name derived from the field name."""
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "parse": parse,
                "tasks": tuple(tasks) if tasks else None, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)


def changed(config, reference) -> dict[str, tuple[Any, Any]]:
    """{field: (reference value, config value)} of the fields where two configs of one class differ."""
    return {f.name: (getattr(reference, f.name), getattr(config, f.name)) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(reference, f.name)}
