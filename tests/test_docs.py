"""The documents name only what exists: configuration keys, metrics, and the files they link to.

Read: README.md and every docs/*.md.

- Every inline code token that looks like a configuration key path (`limits.max_line`,
  `listeners[].tls`, `backends[0].ca`, `tls.alpn: strict`) is a YAML key the schema accepts, or a
  section that holds such keys (`listeners[].proxy_protocol`). The keys are test_examples'
  `documented_keys()`, the same set the configuration reference is checked against.
- Every `poproxy_...` metric name, in text or code blocks, is one a fresh `Metrics()` registry
  exposes: a counter with `_total` or `_created`, a histogram as itself or with `_bucket`,
  `_sum`, `_count` or `_created`, a gauge as itself. `poproxy_starttls_*` stands for the names
  that start so. Label names in `{...}` after a name are that metric's, and a value given to a
  label with fixed values (`result`, `reason`, `kind`, `command`, `direction`) is one of them.
- Every relative link leads to an existing file, and, with a `#fragment`, to a heading of it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from test_examples import PRODUCTION, ROOT, documented_keys

from poproxy import config
from poproxy.metrics import Metrics

README = ROOT / "README.md"
DOCS = ROOT / "docs"
OPERATIONS = DOCS / "operations.md"


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- Reading markdown ---------------------------------------------------------------------------

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def inline_code(text: str) -> Iterator[str]:
    """The inline code spans outside fenced blocks."""
    for match in INLINE_CODE.finditer(prose(text)):
        yield match.group(1)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 for repeated ones."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in HEADING.findall(prose(path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


# --- Configuration key paths ------------------------------------------------------------------

SEGMENT = r"[a-z_]+(?:\[\d*\])?"
KEY_PATH = re.compile(rf"{SEGMENT}(?:\.{SEGMENT})*")
# `tls.crt`, `limits.py`: a file name whose stem happens to be a section's name.
FILE_SUFFIXES = frozenset({"conf", "crt", "json", "key", "map", "md", "pem", "py", "yaml", "yml"})


def names_code(path: str) -> bool:
    """`tls.certificate_names`: an attribute of the poproxy module named like a section."""
    module, _, attribute = path.partition(".")
    try:
        imported = importlib.import_module(f"poproxy.{module}")
    except ImportError:
        return False
    return hasattr(imported, attribute.split(".", 1)[0])


def yaml_key_paths() -> frozenset[str]:
    return frozenset(documented_keys())


def sections() -> frozenset[str]:
    """The top-level YAML keys: a key path starts with one of them."""
    return frozenset(re.split(r"[.\[]", path, maxsplit=1)[0] for path in yaml_key_paths())


def key_path_of(token: str) -> str | None:
    """The key path a code token names, in the reference's notation; None when it names none."""
    candidate = token.split(":", 1)[0].strip() if ":" in token else token.strip()
    if not KEY_PATH.fullmatch(candidate) or not ("." in candidate or "[" in candidate):
        return None
    if re.split(r"[.\[]", candidate, maxsplit=1)[0] not in sections():
        return None
    parts = candidate.split(".")
    if len(parts) == 2 and "[" not in candidate and parts[1] in FILE_SUFFIXES:
        return None
    if "[" not in candidate and names_code(candidate):
        return None
    return re.sub(r"\[\d+\]", "[]", candidate)


def is_key_or_section(path: str) -> bool:
    keys = yaml_key_paths()
    return path in keys or any(key.startswith((f"{path}.", f"{path}[]")) for key in keys)


def named_key_paths(path: Path) -> set[str]:
    found = set()
    for token in inline_code(path.read_text(encoding="utf-8")):
        key = key_path_of(token)
        if key is not None:
            found.add(key)
    return found


def test_key_path_recognition() -> None:
    assert key_path_of("limits.max_line") == "limits.max_line"
    assert key_path_of("listeners[].tls") == "listeners[].tls"
    assert key_path_of("tls.alpn: strict") == "tls.alpn"
    assert key_path_of("backends[0].ca") == "backends[].ca"
    assert key_path_of("tls.certificates[0].key") == "tls.certificates[].key"
    for not_a_key in (
        "tls.crt",
        "limits.py",
        "tls.certificate_names",
        "poproxy.yaml",
        "user: root",
        "tls",
        "host:port",
    ):
        assert key_path_of(not_a_key) is None, not_a_key
    assert is_key_or_section("listeners[].proxy_protocol")
    assert is_key_or_section("tls.certificates")
    assert not is_key_or_section("tls.certificate")
    assert not is_key_or_section("auth_http.max_in_flight")  # a field, never a YAML key


@pytest.mark.parametrize("path", documents(), ids=_name)
def test_every_key_path_named_exists(path: Path) -> None:
    unknown = sorted(key for key in named_key_paths(path) if not is_key_or_section(key))
    assert unknown == [], f"{_name(path)} names configuration keys the schema does not have"


def test_the_documents_name_key_paths() -> None:
    """The check above looks at something: the reference names every nested key."""
    nested = {key for key in yaml_key_paths() if "." in key or "[" in key}
    assert nested <= named_key_paths(OPERATIONS)
    assert {"tls.alpn", "limits.auth_failure_delay"} <= named_key_paths(DOCS / "security.md")


# --- Metrics --------------------------------------------------------------------------------

METRIC = re.compile(r"(?<![\w.])(poproxy_[a-z0-9_]+)(\*?)(\{[^}\n]*\})?")
MATCHER = re.compile(r"\s*([a-zA-Z_]\w*)\s*(?:(=~|!~|!=|=)\s*\"([^\"]*)\")?\s*")
# Labels whose values are fixed by metrics.py; the others carry configured names.
FIXED_LABELS = frozenset({"result", "reason", "kind", "command", "direction"})


@dataclasses.dataclass(frozen=True)
class Exposed:
    labels: frozenset[str]
    values: dict[str, frozenset[str]]  # for the labels in FIXED_LABELS


def exposed_metrics() -> dict[str, Exposed]:
    """Every name a fresh registry exposes, with its label names and the fixed labels' values.

    The registry is configured with the production example, which has listeners of both
    kinds, so that every series with a fixed label value exists.
    """
    metrics = Metrics()
    metrics.configure(config.load(PRODUCTION))
    labels: dict[str, frozenset[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            labels[family.name] = frozenset(value._labelnames)
    exposed: dict[str, Exposed] = {}
    for family in metrics.registry.collect():
        values: dict[str, set[str]] = {}
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                if label in FIXED_LABELS:
                    values.setdefault(label, set()).add(label_value)
        fixed = {label: frozenset(found) for label, found in values.items()}
        names = labels[family.name]
        match family.type:
            case "counter":
                for suffix in ("_total", "_created"):
                    exposed[family.name + suffix] = Exposed(names, fixed)
            case "histogram":
                for suffix in ("", "_sum", "_count", "_created"):
                    exposed[family.name + suffix] = Exposed(names, fixed)
                exposed[family.name + "_bucket"] = Exposed(names | {"le"}, fixed)
            case "gauge":
                exposed[family.name] = Exposed(names, fixed)
            case other:
                pytest.fail(f"{family.name}: metric type {other} is not handled here")
    return exposed


def metric_problems(text: str, exposed: dict[str, Exposed]) -> list[str]:
    problems = []
    for match in METRIC.finditer(text):
        name, wildcard, selector = match.groups()
        if wildcard:
            if not any(known.startswith(name) for known in exposed):
                problems.append(f"{name}*: no metric starts so")
            continue
        if name not in exposed:
            problems.append(f"{name}: no such metric")
            continue
        if not selector or not selector[1:-1].strip():
            continue
        metric = exposed[name]
        for matcher in selector[1:-1].split(","):
            parsed = MATCHER.fullmatch(matcher)
            if parsed is None:
                problems.append(f"{name}{selector}: cannot read {matcher!r}")
                continue
            label, operator, value = parsed.groups()
            if label not in metric.labels:
                problems.append(f"{name}: no label {label!r} (it has {sorted(metric.labels)})")
            elif operator == "=" and label in metric.values and value not in metric.values[label]:
                problems.append(f"{name}: {label}={value!r} is not one of its values")
    return problems


def test_metric_recognition() -> None:
    exposed = exposed_metrics()
    assert "poproxy_connections_total" in exposed and "poproxy_connections" not in exposed
    assert "poproxy_backend_up" in exposed and "poproxy_backend_up_total" not in exposed
    assert exposed["poproxy_tls_handshake_duration_seconds_bucket"].labels == {"listener", "le"}
    assert metric_problems('`poproxy_logins_total{result="auth_failed"}`', exposed) == []
    named = "`poproxy_sessions_closed_total{reason}` and `poproxy_starttls_*`"
    assert metric_problems(named, exposed) == []
    assert metric_problems('poproxy_tls_handshakes_total{result!="success"}', exposed) == []
    assert len(metric_problems('poproxy_logins_total{result="wrong_password"}', exposed)) == 1
    assert len(metric_problems("poproxy_logins_total{listener}", exposed)) == 1
    assert len(metric_problems("poproxy_login_total poproxy_nothing_*", exposed)) == 2


@pytest.mark.parametrize("path", documents(), ids=_name)
def test_every_metric_named_exists(path: Path) -> None:
    problems = metric_problems(path.read_text(encoding="utf-8"), exposed_metrics())
    assert problems == [], f"{_name(path)}: {problems}"


def test_operations_documents_every_metric() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    exposed = exposed_metrics()
    families = {name.removesuffix("_total") for name in exposed if not name.endswith("_created")}
    missing = sorted(
        family
        for family in families
        if not family.endswith(("_bucket", "_sum", "_count"))
        and f"`{family}`" not in text
        and f"`{family}_total`" not in text
    )
    assert missing == [], "metrics missing from docs/operations.md"


# --- Links ----------------------------------------------------------------------------------


def links(path: Path) -> Iterator[tuple[str, Path, str]]:
    """(link as written, target file, fragment) for each relative link outside code blocks."""
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
            continue  # http:, https:, mailto:
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        yield target, resolved, fragment


@pytest.mark.parametrize("path", documents(), ids=_name)
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target, resolved, fragment in links(path):
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment}")
    assert broken == [], f"{_name(path)}: {broken}"


def test_slugs_are_githubs() -> None:
    assert slug("Reload (SIGHUP)") == "reload-sighup"
    assert slug("fail2ban, dashboard, alerts") == "fail2ban-dashboard-alerts"
    assert slug("Module map (package `poproxy/`)") == "module-map-package-poproxy"
    assert slug("The client's address") == "the-clients-address"
    assert slug("auth_http") == "auth_http"


def test_readme_links_every_document() -> None:
    linked = {resolved for _, resolved, _ in links(README)}
    missing = sorted(_name(doc) for doc in DOCS.glob("*.md") if doc.resolve() not in linked)
    assert missing == [], "documents README.md does not link to"


def test_readme_configuration_loads() -> None:
    """README's example is a whole configuration, as the schema reads it."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)
    assert blocks, "README.md has no YAML example"
    for block in blocks:
        assert isinstance(yaml.safe_load(block), dict)
        settings = config.parse(block, source="README.md")
        assert settings.listeners and settings.backends
