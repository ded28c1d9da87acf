"""Checks of the workflow's configuration that its JSON schema cannot make.

YAML silently keeps the last of two equal keys, so two runs (or tasks) given the same name would
lose one of them without a word: the config files are read again here, refusing duplicate keys.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ckpt_stability.errors import InputError


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise InputError(
                    f"line {key_node.start_mark.line + 1}: key {key!r} appears twice (first on line {seen[key]}); "
                    f"two entries with one name would silently become one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def check_unique_keys(path: str | Path) -> None:
    """Refuse a YAML config file with a key given twice in one mapping (e.g. two runs of one name)."""
    try:
        with open(path, encoding="utf-8") as handle:
            yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    except yaml.YAMLError:
        pass  # not YAML (JSON, which Snakemake reads itself) or malformed: Snakemake reports that
