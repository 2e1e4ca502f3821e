"""The shipped configurations load, and README.md's configuration reference matches the schema.

The schema's keys come from `poproxy.config`'s dataclasses; a key path is written as in the
README table: `listeners[].listen` for a key of each item of a list, `limits.max_line` for a key
of a mapping. `Address` values (`host:port` strings in YAML) are leaves, not mappings.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from poproxy import config

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PRODUCTION = ROOT / "config" / "poproxy.yaml"
DEMO = ROOT / "config" / "demo.yaml"

# Dataclass fields that the loader fills in itself: no YAML key sets them.
INTERNAL_FIELDS = frozenset({"source", "key_path"})

# A row of the reference table: its first cell is a backticked key path.
TABLE_ROW = re.compile(r"^\| `([^`]+)` \| (.*) \| (.*) \| (.*) \|$", re.MULTILINE)
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclasses.dataclass(frozen=True)
class SchemaKey:
    owner: type[Any]  # the dataclass that holds the field
    field: dataclasses.Field[Any]
    hint: Any  # the field's resolved type


def _nested(hint: Any) -> tuple[type[Any], bool] | None:
    """(dataclass, is_list) when `hint` is a section of the YAML, None for a leaf value."""
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item) and item is not config.Address:
            return typing.cast(type[Any], item), True
        return None
    if dataclasses.is_dataclass(hint) and hint is not config.Address:
        return typing.cast(type[Any], hint), False
    optional = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if len(optional) == 1 and dataclasses.is_dataclass(optional[0]):
        return typing.cast(type[Any], optional[0]), False  # an optional section
    return None


def schema_keys(owner: type[Any] = config.Config, prefix: str = "") -> dict[str, SchemaKey]:
    """Every leaf key path of the schema, e.g. `backends[].servers`."""
    keys: dict[str, SchemaKey] = {}
    hints = typing.get_type_hints(owner)
    for field in dataclasses.fields(owner):
        if field.name in INTERNAL_FIELDS:
            continue
        path = prefix + field.name
        nested = _nested(hints[field.name])
        if nested is None:
            keys[path] = SchemaKey(owner, field, hints[field.name])
        else:
            section, is_list = nested
            keys.update(schema_keys(section, path + ("[]." if is_list else ".")))
    return keys


def readme_rows() -> dict[str, tuple[str, str, str]]:
    """The configuration reference table: key path -> (type, default, meaning) cells."""
    text = README.read_text(encoding="utf-8")
    assert "\n## Configuration reference\n" in text
    section = text.split("\n## Configuration reference\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str, str]] = {}
    for match in TABLE_ROW.finditer(section):
        key = match.group(1)
        assert key not in rows, f"README lists {key} twice"
        rows[key] = (match.group(2), match.group(3), match.group(4))
    return rows


def yaml_keys(node: Any, prefix: str = "") -> set[str]:
    """Every leaf key path set in a YAML document, in the README's notation."""
    keys: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            keys |= yaml_keys(value, f"{prefix}{key}.") or {f"{prefix}{key}"}
    elif isinstance(node, list) and node and all(isinstance(item, dict) for item in node):
        for item in node:
            keys |= yaml_keys(item, prefix[:-1] + "[].")
    return keys


def _documented_default(cell: str, key: SchemaKey) -> object:
    """The README's default cell as the value the dataclass would hold."""
    text = cell.strip().strip("`")
    if key.hint is float:  # every float in the schema is a duration
        match = DURATION.match(text)
        assert match, f"default {cell!r} is not a duration"
        return float(match.group(1)) * DURATION_UNITS[match.group(2)]
    value: object = yaml.safe_load(text)
    return value


# --- The shipped configurations ---------------------------------------------


def test_production_example_loads() -> None:
    settings = config.load(PRODUCTION)
    assert [(listener.name, listener.tls) for listener in settings.listeners] == [
        ("pop3s", "implicit"),
        ("pop3", "starttls"),
        ("pop3s-v6", "implicit"),
        ("pop3-v6", "starttls"),
    ]
    assert [str(listener.listen) for listener in settings.listeners] == [
        "0.0.0.0:995",
        "0.0.0.0:110",
        "[::]:995",
        "[::]:110",
    ]
    assert [files.cert for files in settings.tls.certificates] == [
        Path("/etc/poproxy/tls/tls.crt"),
        Path("/etc/poproxy/tls/ecdsa.crt"),
    ]
    assert [files.key for files in settings.tls.certificates] == [
        Path("/etc/poproxy/tls/tls.key"),
        Path("/etc/poproxy/tls/ecdsa.key"),
    ]
    (backend,) = settings.backends
    assert backend.name == "legacy"
    assert backend.servers == (config.Address("10.0.0.5", 110), config.Address("10.0.0.6", 110))


def test_production_example_spells_out_the_defaults() -> None:
    settings = config.load(PRODUCTION)
    defaults = config.Backend(name="legacy", servers=settings.backends[0].servers)
    assert settings.backends[0] == defaults
    assert settings.limits == config.Limits()
    assert settings.tls.min_version == config.TlsSettings(certificates=()).min_version
    assert settings.log == config.LogSettings()


def test_production_example_sets_every_key() -> None:
    document = yaml.safe_load(PRODUCTION.read_text(encoding="utf-8"))
    assert yaml_keys(document) == set(schema_keys())


def test_demo_config_loads() -> None:
    settings = config.load(DEMO)
    assert [(listener.name, listener.tls) for listener in settings.listeners] == [
        ("pop3s", "implicit"),
        ("pop3", "starttls"),
    ]
    assert all(listener.listen.host == "127.0.0.1" for listener in settings.listeners)
    assert [backend.name for backend in settings.backends] == ["demo"]
    assert settings.backends[0].servers == (config.Address("127.0.0.1", 10100),)
    # Relative certificate paths start at the configuration file's directory.
    assert settings.tls.certificates[0].cert == DEMO.parent / "demo.crt"


def test_demo_config_is_the_packaged_one() -> None:
    # `poproxy demo` reads poproxy/demo.yaml; config/demo.yaml must not drift from it.
    assert DEMO.is_symlink()
    assert DEMO.resolve() == (ROOT / "poproxy" / "demo.yaml").resolve()


# --- README.md's configuration reference --------------------------------------


def test_readme_documents_exactly_the_schema_keys() -> None:
    documented, schema = set(readme_rows()), set(schema_keys())
    assert documented - schema == set(), "README documents keys the schema does not have"
    assert schema - documented == set(), "schema keys missing from README's table"


@pytest.mark.parametrize("path", sorted(schema_keys()))
def test_readme_default_matches_the_code(path: str) -> None:
    rows = readme_rows()
    assert path in rows, f"{path} is missing from README's table"
    _, default_cell, _ = rows[path]
    key = schema_keys()[path]
    field = key.field
    default: object
    if field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        assert default_cell.strip() == "required"
        return
    if isinstance(default, tuple):
        default = list(default)  # YAML has lists; the schema keeps tuples
    assert _documented_default(default_cell, key) == default
