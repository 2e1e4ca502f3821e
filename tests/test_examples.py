"""The shipped configurations load, and docs/operations.md's configuration reference matches
the schema.

The schema's keys come from `poproxy.config`'s dataclasses; a key path is written as in the
reference table: `listeners[].listen` for a key of each item of a list, `limits.max_line` for a
key of a mapping. `Address` values (`host:port` strings in YAML) are leaves, not mappings.

Most dataclass fields are one YAML key of the same name. `YAML_KEYS_OF_FIELD` lists the few
that are not, and the YAML keys they stand for: the reference documents YAML keys, so the test
compares it with the YAML keys, never with field names a user cannot write. `documented_keys()`
is also what tests/test_docs.py checks every key path named in the documents against.
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
from poproxy.auth_http import AuthHttpSettings

ROOT = Path(__file__).resolve().parent.parent
# The configuration reference: the table under this heading.
REFERENCE = ROOT / "docs" / "operations.md"
REFERENCE_HEADING = "## Configuration reference"
PRODUCTION = ROOT / "config" / "poproxy.yaml"
DEMO = ROOT / "config" / "demo.yaml"

# Dataclass fields that the loader fills in itself: no YAML key sets them.
INTERNAL_FIELDS = frozenset({"source", "key_path"})

# Schema key paths (field names) whose YAML spelling differs -> the YAML key paths they stand
# for; an empty tuple means no YAML key sets the field. Every other field is one YAML key.
YAML_KEYS_OF_FIELD: dict[str, tuple[str, ...]] = {
    # routing.Route keeps a route's kind in `kind` and that kind's value in `values` (users,
    # domains), `pattern` (match) or `map_file`. In YAML the kind is which key the route sets:
    # exactly one of users, domains, match and map_file (config._routes). `map_file`,
    # `backend` and `rewrite_user` are spelt the same in both.
    "routes[].kind": (),
    "routes[].values": ("routes[].users", "routes[].domains"),
    "routes[].pattern": ("routes[].match",),
    # An item of `servers` is a "host:port" string or a mapping {address, weight}: the
    # addresses go to Backend.servers, the weights to Backend.weights.
    "backends[].servers": ("backends[].servers", "backends[].servers[].address"),
    "backends[].weights": ("backends[].servers[].weight",),
    # AuthHttpSettings.max_in_flight has no YAML key: it always has its default.
    "auth_http.max_in_flight": (),
}

# `auth_http` replaces `routes` (a session with auth_http asks the auth service and never the
# routes), so the production example, which shows routes, has auth_http as a comment line.
# These keys are set in that comment instead of in the document.
COMMENTED_OUT_PREFIX = "auth_http."
COMMENTED_OUT_LINE = re.compile(r"^# (auth_http:.*)$", re.MULTILINE)

# A row of the reference table: its first cell is a backticked key path.
TABLE_ROW = re.compile(r"^\| `([^`]+)` \| (.*) \| (.*) \| (.*) \|$", re.MULTILINE)
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# A document with one `servers` item of each form, for what the loader makes of them.
SERVER_FORMS = """\
listeners: [{name: pop3s, listen: "127.0.0.1:995", tls: implicit}]
tls: {certificates: [{cert: tls.crt, key: tls.key}]}
backends: [{name: b, servers: [{address: "10.0.0.5"}, {address: "10.0.0.6", weight: 2}]}]
"""


@dataclasses.dataclass(frozen=True)
class SchemaKey:
    owner: type[Any]  # the dataclass that holds the field
    field: dataclasses.Field[Any]
    hint: Any  # the field's resolved type


@dataclasses.dataclass(frozen=True)
class YamlKey:
    """A key a configuration file can set, and what the code gives it when it is left out."""

    schema: SchemaKey  # the field it sets
    required: bool
    default: object  # as YAML would write it (a list, not a tuple); None when not set


def _default_weight() -> int:
    # Backend.weights is empty when every weight is 1, so the field's default () says nothing
    # about one server; what the loader gives a server without `weight` does.
    backend = config.parse(SERVER_FORMS).backends[0]
    assert backend.weights == (1, 2)
    return backend.weight(0)


# YAML keys whose default is not their field's default.
YAML_DEFAULTS: dict[str, object] = {"backends[].servers[].weight": _default_weight()}


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
    """Every leaf field path of the schema, e.g. `backends[].servers`."""
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


def documented_keys() -> dict[str, YamlKey]:
    """Every leaf YAML key path, e.g. `backends[].servers[].weight`, with its default."""
    keys: dict[str, YamlKey] = {}
    for path, key in schema_keys().items():
        for yaml_path in YAML_KEYS_OF_FIELD.get(path, (path,)):
            assert yaml_path not in keys, f"two fields claim {yaml_path}"
            keys[yaml_path] = _yaml_key(yaml_path, key)
    return keys


def _yaml_key(path: str, key: SchemaKey) -> YamlKey:
    field = key.field
    default: object
    if path in YAML_DEFAULTS:
        default = YAML_DEFAULTS[path]
    elif field.default is not dataclasses.MISSING:
        default = field.default
    elif field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        return YamlKey(key, required=True, default=None)
    if isinstance(default, tuple):
        default = list(default)  # YAML has lists; the schema keeps tuples
    return YamlKey(key, required=False, default=default)


def reference_rows() -> dict[str, tuple[str, str, str]]:
    """The configuration reference table: key path -> (type, default, meaning) cells."""
    text = REFERENCE.read_text(encoding="utf-8")
    heading = f"\n{REFERENCE_HEADING}\n"
    assert heading in text, f"{REFERENCE.name} has no {REFERENCE_HEADING!r} section"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, str, str]] = {}
    for match in TABLE_ROW.finditer(section):
        key = match.group(1)
        assert key not in rows, f"the configuration reference lists {key} twice"
        rows[key] = (match.group(2), match.group(3), match.group(4))
    return rows


def yaml_keys(node: Any, path: str = "") -> set[str]:
    """Every leaf key path set in a YAML document, in the reference's notation.

    A list of mappings contributes its items' keys (`listeners[].name`); a list of plain
    values is a leaf. `servers` may mix both forms, and then contributes both.
    """
    if isinstance(node, dict):
        keys: set[str] = set()
        for key, value in node.items():
            keys |= yaml_keys(value, f"{path}.{key}" if path else str(key))
        return keys
    if isinstance(node, list) and any(isinstance(item, dict) for item in node):
        keys = set()
        for item in node:
            keys |= yaml_keys(item, path + "[]") if isinstance(item, dict) else {path}
        return keys
    return {path}


def commented_out() -> dict[str, Any]:
    """The production example's `# auth_http: ...` line, as YAML."""
    (line,) = COMMENTED_OUT_LINE.findall(PRODUCTION.read_text(encoding="utf-8"))
    document = yaml.safe_load(line)
    assert isinstance(document, dict)
    return document


def _documented_default(cell: str, key: YamlKey) -> object:
    """The reference's default cell as the value the dataclass would hold."""
    text = cell.strip().strip("`")
    if key.schema.hint is float:  # every float in the schema is a duration
        match = DURATION.match(text)
        assert match, f"default {cell!r} is not a duration"
        return float(match.group(1)) * DURATION_UNITS[match.group(2)]
    value: object = yaml.safe_load(text)
    return value


# --- The translation itself ----------------------------------------------------


def test_translation_names_only_real_fields_and_keys() -> None:
    assert set(YAML_KEYS_OF_FIELD) <= set(schema_keys()), "YAML_KEYS_OF_FIELD names no field"
    assert set(YAML_DEFAULTS) <= set(documented_keys()), "YAML_DEFAULTS names no YAML key"


def test_every_server_form_loads() -> None:
    backend = config.parse(SERVER_FORMS).backends[0]
    assert backend.servers == (config.Address("10.0.0.5", 110), config.Address("10.0.0.6", 110))


# --- The shipped configurations ---------------------------------------------


def test_production_example_loads() -> None:
    settings = config.load(PRODUCTION)
    assert [(listener.name, listener.tls) for listener in settings.listeners] == [
        ("pop3s", "implicit"),
        ("pop3", "starttls"),
        ("pop3s-v6", "implicit"),
        ("pop3-v6", "starttls"),
        ("pop3s-lb", "implicit"),
    ]
    assert [str(listener.listen) for listener in settings.listeners] == [
        "0.0.0.0:995",
        "0.0.0.0:110",
        "[::]:995",
        "[::]:110",
        "0.0.0.0:10995",
    ]
    assert [listener.proxy_protocol is not None for listener in settings.listeners] == [
        False,
        False,
        False,
        False,
        True,
    ]
    assert [files.cert for files in settings.tls.certificates] == [
        Path("/etc/poproxy/tls/tls.crt"),
        Path("/etc/poproxy/tls/ecdsa.crt"),
    ]
    assert [files.key for files in settings.tls.certificates] == [
        Path("/etc/poproxy/tls/tls.key"),
        Path("/etc/poproxy/tls/ecdsa.key"),
    ]
    legacy, mail_b = settings.backends
    assert legacy.name == "legacy"
    assert legacy.servers == (config.Address("10.0.0.5", 110), config.Address("10.0.0.6", 110))
    assert legacy.weights == (1, 2)
    assert mail_b.name == "mail-b"
    assert (mail_b.balance, mail_b.proxy_protocol, mail_b.tls) == ("user_hash", "v2", "starttls")
    assert [(route.kind, route.backend) for route in settings.routes] == [
        ("users", "mail-b"),
        ("domains", "mail-b"),
        ("match", "legacy"),
        ("map_file", None),
    ]
    assert settings.auth_http is None  # a comment in the example: it replaces routes


def test_production_example_auth_http_comment_loads() -> None:
    document = yaml.safe_load(PRODUCTION.read_text(encoding="utf-8"))
    del document["routes"]  # auth_http replaces routes: the two exclude each other
    document.update(commented_out())
    settings = config.parse(yaml.safe_dump(document), source=str(PRODUCTION))
    assert settings.auth_http is not None
    # It spells out the default timeout.
    assert settings.auth_http == AuthHttpSettings(url=settings.auth_http.url)


def test_production_example_spells_out_the_defaults() -> None:
    settings = config.load(PRODUCTION)
    legacy = settings.backends[0]
    defaults = config.Backend(
        name="legacy",
        servers=legacy.servers,
        weights=legacy.weights,
        health_check=config.HealthCheck(),
    )
    assert legacy == defaults
    listener_defaults = config.Listener("", config.Address("", 0), "implicit")
    for listener in settings.listeners:
        assert listener.plaintext_hint_after == listener_defaults.plaintext_hint_after
        assert listener.implicit_tls_window == listener_defaults.implicit_tls_window
    inbound = settings.listeners[-1].proxy_protocol
    assert inbound == config.InboundProxyProtocol(trusted=("10.0.0.0/8",))
    assert settings.limits == config.Limits()
    assert settings.tls.min_version == config.TlsSettings(certificates=()).min_version
    assert settings.log == config.LogSettings()


def test_production_example_sets_every_key() -> None:
    document = yaml.safe_load(PRODUCTION.read_text(encoding="utf-8"))
    documented = set(documented_keys())
    commented = {key for key in documented if key.startswith(COMMENTED_OUT_PREFIX)}
    assert commented, "no auth_http keys: drop COMMENTED_OUT_PREFIX"
    assert yaml_keys(document) == documented - commented
    assert yaml_keys(commented_out()) == commented


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


# --- docs/operations.md's configuration reference -------------------------------


def test_reference_documents_exactly_the_yaml_keys() -> None:
    documented, keys = set(reference_rows()), set(documented_keys())
    assert documented - keys == set(), "the reference documents keys the schema does not have"
    assert keys - documented == set(), "YAML keys missing from the reference's table"


@pytest.mark.parametrize("path", sorted(documented_keys()))
def test_reference_default_matches_the_code(path: str) -> None:
    rows = reference_rows()
    assert path in rows, f"{path} is missing from the reference's table"
    _, default_cell, _ = rows[path]
    key = documented_keys()[path]
    if key.required:
        assert default_cell.strip() == "required"
        return
    assert _documented_default(default_cell, key) == key.default
