"""What every config dataclass shares: fields with a one-line help, a dict round trip that
refuses unknown names, and the help table the CLI and the app show."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import field


def option(default, help_: str):
    """A dataclass field with a default (a fresh copy for dicts and lists) and its help."""
    kw = {"default_factory": lambda: type(default)(default)} \
        if isinstance(default, (dict, list)) else {"default": default}
    return field(metadata={"help": help_}, **kw)


class ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``help`` for a dataclass (validated in ``__post_init__``)."""

    def to_dict(self) -> dict:
        """Plain JSON data (tuples as lists), so a dict equals its own JSON round trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; "
                             f"known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}
