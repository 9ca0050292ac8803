"""YAML of config files and `key=value` overrides: PyYAML's safe loader, strict where it is lenient.

What differs from `yaml.safe_load`:
- a key given twice in one mapping is an error naming the key and both lines (PyYAML keeps the last value
  silently: `lr: 1.0e-4` then `lr: 0.5` would train at 0.5);
- aliases (`*name`) are refused with their line: a config never needs them, and nested aliases expand
  exponentially when the value is walked ("billion laughs": a few hundred bytes, gigabytes once expanded);
- a file over `MAX_BYTES` or with more than `MAX_NODES` values is refused before it is built (a 3-million-element
  list takes ~30 s to construct, and the error that quotes it would be megabytes).
Errors are `StrictYAMLError` (a ValueError); config.py turns them into ConfigError naming the file. libyaml's
C parser is used where installed (a 1 MiB scalar parses in ~0.03 s).
"""

from __future__ import annotations

import yaml

MAX_BYTES = 1 << 20  # configs are a few KB (the largest preset is ~2 KB)
MAX_NODES = 100_000  # scalars, sequences and mappings in one document

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StrictYAMLError(ValueError):
    """A config text PyYAML would accept but erpd refuses (the message names the line)."""


class _Loader(_Base):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue  # a complex key: construct_mapping refuses unhashable ones itself
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise StrictYAMLError(f"duplicate key {key!r} at line {line} (first at line {first[key]})")
                first[key] = line
        return super().construct_mapping(node, deep=deep)



def _check_events(text: str) -> None:
    """Aliases and the node count, from the parser's events (no object is built)."""
    nodes = 0
    for event in yaml.parse(text, Loader=_Base):
        if isinstance(event, yaml.AliasEvent):
            raise StrictYAMLError(f"alias *{event.anchor} at line {event.start_mark.line + 1}: aliases are not "
                                  "allowed in a config (write the value out)")
        if isinstance(event, yaml.ScalarEvent | yaml.SequenceStartEvent | yaml.MappingStartEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise StrictYAMLError(f"more than {MAX_NODES} values (at line {event.start_mark.line + 1}): "
                                      "not a config")


def load(text: str | bytes):
    """One YAML document, checked as above; raises StrictYAMLError or yaml.YAMLError."""
    if len(text) > MAX_BYTES:
        raise StrictYAMLError(f"{len(text)} bytes, more than the {MAX_BYTES} a config may have")
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    _check_events(text)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
