"""Offline checks of ``infra/`` (Bicep), ``host.json`` and ``azure.yaml`` against Lead Writer's contracts.

No Bicep compiler and no Azure here, so the Bicep files are parsed with pycep and evaluated just far
enough to see what they deploy: parameters (``main.parameters.json`` values, else defaults),
variables, module parameters and outputs, ``for`` loops over known arrays, ``if`` conditions,
``union()`` and string interpolation. Whatever is only known at deployment time (a resource id, a
``guid()``) stays an :class:`Unknown`.

Every ``check_*`` function returns a list of problems, empty when the check passes, so tests can run
the same function against the real tree and against deliberately broken copies. ``run_all`` runs
them all; ``python -m tests.infra_checks`` (``make infra-check``) adds checkov and exits non-zero on
any problem.

Checkov policy: offline (``--skip-download``) checkov has no severities (they come from the
platform API), so every failed check fails the build unless the resource carries an inline
``// checkov:skip=CKV_…: reason`` with a real reason (:func:`check_suppressions`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pycep import BicepParser
from pycep.models import BicepElement

from shared import names
from shared.settings import Settings

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"

GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# Built-in Azure role definition ids (identical in every tenant).
SB_DATA_RECEIVER = "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0"
SB_DATA_SENDER = "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39"
SB_DATA_OWNER = "090c5cfd-751d-490a-894a-3ce6f1109419"
KV_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
KV_SECRETS_OFFICER = "b86a8fe4-44ce-4948-aee5-eccb2c155cd7"
KV_ADMINISTRATOR = "00482a5a-887f-4fb3-b363-3b7fe8e74483"
STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
STORAGE_QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
OWNER = "8e3af657-a8ff-443c-a75c-2fe8c4bcb635"
CONTRIBUTOR = "b24988ac-6180-42a0-ab88-20f7382dd24c"
USER_ACCESS_ADMINISTRATOR = "18d7d88d-d35e-4fb5-a5c3-7773c20a72d9"

ROLE_NAMES = {
    SB_DATA_RECEIVER: "Azure Service Bus Data Receiver",
    SB_DATA_SENDER: "Azure Service Bus Data Sender",
    SB_DATA_OWNER: "Azure Service Bus Data Owner",
    KV_SECRETS_USER: "Key Vault Secrets User",
    KV_SECRETS_OFFICER: "Key Vault Secrets Officer",
    KV_ADMINISTRATOR: "Key Vault Administrator",
    STORAGE_BLOB_DATA_OWNER: "Storage Blob Data Owner",
    STORAGE_QUEUE_DATA_CONTRIBUTOR: "Storage Queue Data Contributor",
    STORAGE_TABLE_DATA_CONTRIBUTOR: "Storage Table Data Contributor",
    MONITORING_METRICS_PUBLISHER: "Monitoring Metrics Publisher",
    OWNER: "Owner",
    CONTRIBUTOR: "Contributor",
    USER_ACCESS_ADMINISTRATOR: "User Access Administrator",
}

QUEUE_TYPE = "Microsoft.ServiceBus/namespaces/queues"
NAMESPACE_TYPE = "Microsoft.ServiceBus/namespaces"
VAULT_TYPE = "Microsoft.KeyVault/vaults"
SECRET_TYPE = "Microsoft.KeyVault/vaults/secrets"
STORAGE_TYPE = "Microsoft.Storage/storageAccounts"
CONTAINER_TYPE = "Microsoft.Storage/storageAccounts/blobServices/containers"
TABLE_SERVICE_TYPE = "Microsoft.Storage/storageAccounts/tableServices"
TABLE_TYPE = "Microsoft.Storage/storageAccounts/tableServices/tables"
COMPONENT_TYPE = "Microsoft.Insights/components"
SITE_TYPE = "Microsoft.Web/sites"
ROLE_ASSIGNMENT_TYPE = "Microsoft.Authorization/roleAssignments"

#: The least-privilege list: every role the deployment may grant, and the scopes it may be granted at.
#: Service Bus roles only on single queues (never the namespace) — Data Owner included, which the
#: scale controller needs to read queue lengths (docs/deploy.md); table data only on single tables;
#: no Owner, Contributor or User Access Administrator.
ALLOWED_ROLE_SCOPES: Mapping[str, frozenset[str]] = {
    SB_DATA_RECEIVER: frozenset({QUEUE_TYPE}),
    SB_DATA_SENDER: frozenset({QUEUE_TYPE}),
    SB_DATA_OWNER: frozenset({QUEUE_TYPE}),
    STORAGE_TABLE_DATA_CONTRIBUTOR: frozenset({TABLE_TYPE}),
    KV_SECRETS_USER: frozenset({VAULT_TYPE, SECRET_TYPE}),
    KV_SECRETS_OFFICER: frozenset({VAULT_TYPE}),
    STORAGE_BLOB_DATA_OWNER: frozenset({STORAGE_TYPE, CONTAINER_TYPE}),
    MONITORING_METRICS_PUBLISHER: frozenset({COMPONENT_TYPE}),
}

#: Text that only a key, SAS or connection string produces. None may appear anywhere in infra/.
FORBIDDEN_TEXT = (
    "AccountKey=",
    "SharedAccessKey",
    "SharedAccessSignature",
    "listKeys(",
    "listConnectionStrings(",
    "listAccountSas(",
    "listServiceSas(",
    "Endpoint=sb://",
)
#: Resource types that exist only to hand out SAS keys.
FORBIDDEN_TYPES = (
    "Microsoft.ServiceBus/namespaces/AuthorizationRules",
    "Microsoft.ServiceBus/namespaces/queues/authorizationRules",
    "Microsoft.Storage/storageAccounts/listKeys",
)
#: The one app setting with "connection string" in its name that carries no secret: with local auth
#: off on the Application Insights component, its instrumentation key cannot ingest anything alone.
ALLOWED_CONNECTION_STRING_SETTINGS = frozenset({"APPLICATIONINSIGHTS_CONNECTION_STRING"})
SECRET_LIKE_SETTING = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|CONNECTION_?STRING)$", re.IGNORECASE)
KEY_VAULT_REFERENCE = "@Microsoft.KeyVault(SecretUri="

SKIP_COMMENT = re.compile(r"checkov:skip=([A-Za-z0-9_,-]*)(?::(.*))?")
MIN_REASON_LENGTH = 15

#: azd's ``${NAME}`` / ``${NAME=default}`` substitution in main.parameters.json.
AZD_ENV_REFERENCE = re.compile(r"\$\{(\w+)(?:=([^}]*))?\}")
#: Length of the password azd's secretOrRandomPassword generates when the secret does not exist yet:
#: 5 lower + 5 upper + 5 digits (Azure/azure-dev cli/azd/pkg/cmdsubst/secretOrRandomPassword.go).
AZD_RANDOM_PASSWORD_LENGTH = 15
#: Python versions the Flex Consumption runtime parameter must offer, and its default.
PYTHON_VERSIONS = ("3.11", "3.12")
DEFAULT_PYTHON_VERSION = "3.11"
#: What .funcignore must keep out of the deployment package (local state, secrets, tooling).
FUNCIGNORE_REQUIRED = (
    ".leadwriter/",
    "local.settings.json",
    ".git*",
    "tests/",
    ".venv*/",
    "node_modules/",
    "__pycache__/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".pytest_cache/",
    ".hypothesis/",
    "docs/",
    "samples/",
)
#: Time budgeted to settle one message of a write batch (complete, or send its replacement first).
SETTLE_PER_MESSAGE = timedelta(milliseconds=100)


# ---------------------------------------------------------------------------------------------
# Evaluating Bicep far enough to see what it deploys
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unknown:
    """A value known only at deployment time; ``text`` says where it came from."""

    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ResourceRef:
    """A reference to a resource by its symbolic name (``scope: queues[i]``, ``kv.id``)."""

    symbol: str
    type: str
    name: object
    file: Path

    def __str__(self) -> str:
        return f"{self.type}/{self.name}"


@dataclass(frozen=True)
class Resource:
    """One resource a deployment declares, its configuration evaluated as far as possible."""

    symbol: str
    type: str
    name: object
    existing: bool
    file: Path
    config: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)

    @property
    def properties(self) -> Mapping[str, Any]:
        value = self.config.get("properties", {})
        return value if isinstance(value, Mapping) else {}

    def where(self) -> str:
        return f"{self.file.name}:{self.symbol}"


@dataclass
class Deployment:
    """The evaluated deployment: every file reached from ``main.bicep`` and its resources."""

    infra_dir: Path
    files: dict[Path, dict[str, Any]] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    #: Output name → evaluated value, per file.
    outputs: dict[Path, dict[str, object]] = field(default_factory=dict)

    def of_type(self, type_: str, *, existing: bool = False) -> list[Resource]:
        return [r for r in self.resources if r.type.lower() == type_.lower() and r.existing == existing]


class _Module:
    """A module reference: its outputs are evaluated on first use."""

    def __init__(self, template: _Template) -> None:
        self.template = template


class _Template:
    """One Bicep file with bound parameters, evaluated lazily and memoised."""

    def __init__(
        self, deployment: Deployment, path: Path, args: Mapping[str, object], parser: BicepParser
    ) -> None:
        self.deployment = deployment
        self.path = path
        self.args = dict(args)
        self.parser = parser
        self.parsed: dict[str, Any] = dict(parser.parse(file_path=path))
        deployment.files[path] = self.parsed
        self._cache: dict[str, object] = {}
        self._busy: set[str] = set()
        self._modules: dict[str, _Template] = {}

    # -- names ---------------------------------------------------------------------------------

    def lookup(self, name: str) -> object:
        if name in self._cache:
            return self._cache[name]
        if name in self._busy:
            return Unknown(name)
        self._busy.add(name)
        try:
            value = self._compute(name)
        finally:
            self._busy.discard(name)
        self._cache[name] = value
        return value

    def _compute(self, name: str) -> object:
        parsed = self.parsed
        if name in parsed.get("parameters", {}):
            if name in self.args:
                return self.args[name]
            param = parsed["parameters"][name]
            return self.evaluate(param["default"], {}) if "default" in param else Unknown(f"param {name}")
        if name in parsed.get("variables", {}):
            return self.evaluate(parsed["variables"][name]["value"], {})
        if name in parsed.get("resources", {}):
            refs = [ResourceRef(r.symbol, r.type, r.name, self.path) for r in self._instances(name)]
            if "loop_type" in parsed["resources"][name]["config"]:
                return refs
            return refs[0] if refs else Unknown(name)
        if name in parsed.get("modules", {}):
            return _Module(self.module(name))
        return Unknown(name)

    def module(self, name: str) -> _Template:
        if name not in self._modules:
            module = self.parsed["modules"][name]
            config = module["config"]
            params = config.get("params", {}) if isinstance(config, dict) else {}
            args = {key: self.evaluate(value, {}) for key, value in params.items()}
            path = (self.path.parent / module["detail"]["path"]).resolve()
            self._modules[name] = _Template(self.deployment, path, args, self.parser)
        return self._modules[name]

    def output(self, name: str) -> object:
        outputs = self.parsed.get("outputs", {})
        return self.evaluate(outputs[name]["value"], {}) if name in outputs else Unknown(f"output {name}")

    # -- resources -----------------------------------------------------------------------------

    def _instances(self, symbol: str) -> list[Resource]:
        entry = self.parsed["resources"][symbol]
        config = entry["config"]
        instances: list[tuple[str, Mapping[str, Any], dict[str, object]]] = []
        if "loop_type" in config:
            items = self._loop_items(config["loop_type"], {})
            for index, binding in enumerate(items):
                if self._condition(config.get("condition"), binding):
                    instances.append((f"{symbol}[{index}]", config["config"], binding))
        elif "condition" in config and "config" in config and len(config) <= 3:
            if self._condition(config["condition"], {}):
                instances.append((symbol, config["config"], {}))
        else:
            instances.append((symbol, config, {}))
        resources = []
        for label, raw, binding in instances:
            evaluated = self.evaluate(raw, binding)
            assert isinstance(evaluated, dict)
            resources.append(
                Resource(
                    symbol=label,
                    type=entry["type"],
                    name=evaluated.get("name"),
                    existing=bool(entry.get("existing")),
                    file=self.path,
                    config=evaluated,
                    raw=raw,
                )
            )
        return resources

    def _condition(self, condition: object, binding: Mapping[str, object]) -> bool:
        if condition is None:
            return True
        value = self.evaluate(condition, binding)
        # An unknown condition may be true when deployed: keep the resource in view.
        return value is not False

    def _loop_items(
        self, loop_type: Mapping[str, Any], local: Mapping[str, object]
    ) -> list[dict[str, object]]:
        detail = loop_type["detail"]
        kind = loop_type["type"]
        if kind == "range":
            return []
        array = self.evaluate(detail.get("array_name"), local)
        if not isinstance(array, list):
            return []
        items = []
        for index, item in enumerate(array):
            binding = dict(local)
            binding[str(detail["item_name"])] = item
            if kind == "array_index":
                binding[str(detail["index_name"])] = index
            items.append(binding)
        return items

    # -- expressions ---------------------------------------------------------------------------

    def evaluate(self, expr: object, local: Mapping[str, object]) -> object:
        if isinstance(expr, BicepElement):
            name = str(expr)
            return local[name] if name in local else self.lookup(name)
        if isinstance(expr, str):
            return self._interpolate(expr, local)
        if expr is None or isinstance(expr, bool | int):
            return expr
        if isinstance(expr, list):
            return [self.evaluate(item, local) for item in expr]
        if isinstance(expr, dict):
            if "loop_type" in expr and "config" in expr:
                return [
                    self.evaluate(expr["config"], binding)
                    for binding in self._loop_items(expr["loop_type"], local)
                    if self._condition(expr.get("condition"), binding)
                ]
            if set(expr) == {"operator"}:
                return self._operator(expr["operator"], local)
            if set(expr) == {"function"}:
                return self._function(expr["function"], local)
            return {_key(str(key)): self.evaluate(value, local) for key, value in expr.items()}
        return Unknown(repr(expr))

    def _interpolate(self, text: str, local: Mapping[str, object]) -> str:
        def substitute(match: re.Match[str]) -> str:
            inner = match.group(1).strip()
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", inner):
                return match.group(0)
            head, *path = inner.split(".")
            value = local[head] if head in local else self.lookup(head)
            for segment in path:
                value = self._member(value, segment)
            return (
                str(value) if isinstance(value, str | int) and not isinstance(value, bool) else match.group(0)
            )

        return re.sub(r"\$\{([^{}]*)\}", substitute, text)

    def _segments(self, expr: object, local: Mapping[str, object]) -> list[object]:
        # pycep nests `a.b.c` to the right: property_accessor(a, property_accessor(b, c)).
        if isinstance(expr, dict) and set(expr) == {"operator"}:
            op = expr["operator"]
            if op["type"] == "property_accessor":
                return self._segments(op["operands"]["operand_1"], local) + self._segments(
                    op["operands"]["operand_2"], local
                )
            if op["type"] == "index_accessor":
                index = self.evaluate(op["operands"]["operand_2"], local)
                return [*self._segments(op["operands"]["operand_1"], local), _Index(index)]
        return [str(expr)]

    def _member(self, value: object, segment: object) -> object:
        if isinstance(segment, _Index):
            key = segment.key
            if isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
                return value[key]
            if isinstance(value, dict) and isinstance(key, str):
                return value.get(key, Unknown(f"{value}[{key}]"))
            return Unknown(f"{value}[{key}]")
        if isinstance(value, _Module):
            return _Outputs(value.template) if segment == "outputs" else Unknown(f"module.{segment}")
        if isinstance(value, _Outputs):
            return value.template.output(str(segment))
        if isinstance(value, ResourceRef):
            return value.name if segment == "name" else Unknown(f"{value}.{segment}")
        if isinstance(value, dict):
            return value.get(str(segment), Unknown(f"{segment}"))
        return Unknown(f"{value}.{segment}")

    def _operator(self, op: Mapping[str, Any], local: Mapping[str, object]) -> object:
        kind = op["type"]
        operands = op.get("operands", {})
        if kind == "property_accessor":
            base = self.evaluate(operands["operand_1"], local)
            for segment in self._segments(operands["operand_2"], local):
                base = self._member(base, segment)
            return base
        if kind == "index_accessor":
            base = self.evaluate(operands["operand_1"], local)
            return self._member(base, _Index(self.evaluate(operands["operand_2"], local)))
        if kind == "nested_resource_accessor":
            return self.lookup(f"{operands['operand_1']}__{operands['operand_2']}")
        if kind == "conditional":
            condition = self.evaluate(operands["condition"], local)
            if isinstance(condition, bool):
                return self.evaluate(operands["true_value" if condition else "false_value"], local)
            return Unknown(f"({condition}) ? ...")
        if kind == "not":
            value = self.evaluate(operands["bool_value"], local)
            return (not value) if isinstance(value, bool) else Unknown(f"!{value}")
        if kind in ("equals", "not_equals"):
            left = self.evaluate(operands["operand_1"], local)
            right = self.evaluate(operands["operand_2"], local)
            if isinstance(left, Unknown | ResourceRef) or isinstance(right, Unknown | ResourceRef):
                return Unknown(f"{left} {kind} {right}")
            return (left == right) == (kind == "equals")
        values = [self.evaluate(value, local) for value in operands.values()]
        return Unknown(f"{kind}({', '.join(map(str, values))})")

    def _function(self, fn: Mapping[str, Any], local: Mapping[str, object]) -> object:
        kind = fn["type"]
        params = fn.get("parameters") or {}
        args = [self.evaluate(value, local) for value in params.values() if value is not None]
        if kind == "union" and args and all(isinstance(arg, dict) for arg in args):
            merged: dict[str, object] = {}
            for arg in args:
                assert isinstance(arg, dict)
                merged.update(arg)
            return merged
        if kind == "empty" and len(args) == 1 and isinstance(args[0], str | list | dict):
            return len(args[0]) == 0
        if kind == "load_json_content" and args and isinstance(args[0], str):
            loaded: object = json.loads((self.path.parent / args[0]).read_text())
            return loaded
        return Unknown(f"{kind}({', '.join(map(str, args))})")


def _key(key: str) -> str:
    # Quoted object keys ('azd-service-name': ...) arrive with their quotes.
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == "'" else key


@dataclass(frozen=True)
class _Index:
    key: object


class _Outputs:
    def __init__(self, template: _Template) -> None:
        self.template = template


def _azd_value(value: object) -> object:
    """A main.parameters.json value as azd passes it when the environment sets nothing: a lone
    ``${NAME=default}`` becomes its default, ``${NAME}`` (or ``$(command …)``) stays unknown."""
    if not isinstance(value, str):
        return value
    match = AZD_ENV_REFERENCE.fullmatch(value.strip())
    if match:
        return match.group(2) if match.group(2) is not None else Unknown(f"azd env {match.group(1)}")
    if value.strip().startswith("$("):
        return Unknown(f"azd command {value.strip()}")
    return value


def load_deployment(infra_dir: Path | None = None) -> Deployment:
    """Parse and evaluate ``main.bicep`` and every module it reaches, with ``main.parameters.json``.

    Raises ValueError (from pycep) when a Bicep file does not parse, FileNotFoundError when one is missing.
    """
    infra_dir = (infra_dir or REPO_ROOT / "infra").resolve()
    parameters_file = infra_dir / "main.parameters.json"
    args: dict[str, object] = {}
    if parameters_file.exists():
        parameters = json.loads(parameters_file.read_text()).get("parameters", {})
        args = {name: _azd_value(entry["value"]) for name, entry in parameters.items() if "value" in entry}
    deployment = Deployment(infra_dir=infra_dir)
    parser = BicepParser()
    pending = [_Template(deployment, infra_dir / "main.bicep", args, parser)]
    seen: set[int] = set()
    while pending:
        template = pending.pop(0)
        if id(template) in seen:
            continue
        seen.add(id(template))
        for symbol in template.parsed.get("resources", {}):
            deployment.resources.extend(template._instances(symbol))
        deployment.outputs[template.path] = {
            name: template.output(name) for name in template.parsed.get("outputs", {})
        }
        pending.extend(template.module(name) for name in template.parsed.get("modules", {}))
    return deployment


# ---------------------------------------------------------------------------------------------
# What other checks reuse (the function_app.py binding check among them)
# ---------------------------------------------------------------------------------------------


def bicep_queue_names(deployment: Deployment | None = None) -> tuple[str, ...]:
    """The Service Bus queues the Bicep deploys, in declaration order (unknown names as text)."""
    deployment = deployment or load_deployment()
    return tuple(str(queue.name) for queue in deployment.of_type(QUEUE_TYPE))


def bicep_app_settings(deployment: Deployment | None = None) -> dict[str, object]:
    """The Function App's app settings as the Bicep sets them (values unknown until deployment are
    :class:`Unknown`). Raises LookupError when the Bicep declares no ``appsettings`` config."""
    deployment = deployment or load_deployment()
    for config in deployment.of_type("Microsoft.Web/sites/config"):
        if config.name == "appsettings" and isinstance(config.config.get("properties"), dict):
            return dict(config.config["properties"])
    raise LookupError("no Microsoft.Web/sites/config 'appsettings' resource in infra/")


# ---------------------------------------------------------------------------------------------
# Checks: each returns a list of problems
# ---------------------------------------------------------------------------------------------


def _iso_duration(text: object) -> timedelta | None:
    match = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?)?", str(text))
    if not match or text in ("P", "PT"):
        return None
    days, hours, minutes, seconds = match.groups()
    return timedelta(
        days=int(days or 0), hours=int(hours or 0), minutes=int(minutes or 0), seconds=float(seconds or 0)
    )


def _timespan(text: object) -> timedelta | None:
    match = re.fullmatch(r"(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2}(?:\.\d+)?)", str(text))
    if not match:
        return None
    days, hours, minutes, seconds = match.groups()
    return timedelta(days=int(days or 0), hours=int(hours), minutes=int(minutes), seconds=float(seconds))


def check_parsing(deployment: Deployment) -> list[str]:
    """pycep keeps only one nested child resource per parent; declare children with ``parent:``."""
    problems = []
    for path, parsed in deployment.files.items():
        declared = len(re.findall(r"^\s*resource\s+\w+\s+'", path.read_text(), flags=re.MULTILINE))
        parsed_count = len(parsed.get("resources", {}))
        if declared != parsed_count:
            problems.append(
                f"{path.name}: {declared} resources declared but {parsed_count} parsed; "
                "declare child resources at top level with `parent:` so they can be checked"
            )
    return problems


def check_queues(deployment: Deployment) -> list[str]:
    """Stage queues: the names of shared/names.py, dead-lettering, duplicate detection, sane locks."""
    problems = []
    queues = deployment.of_type(QUEUE_TYPE)
    found = tuple(str(q.name) for q in queues)
    if found != names.SERVICE_BUS_QUEUES:
        problems.append(
            f"queue names {found} differ from shared/names.py SERVICE_BUS_QUEUES {names.SERVICE_BUS_QUEUES}"
        )
    for queue in queues:
        props = queue.properties
        label = f"queue {queue.name} ({queue.where()})"
        for key, expected in (
            ("deadLetteringOnMessageExpiration", True),
            ("requiresDuplicateDetection", True),
        ):
            if props.get(key) is not expected:
                problems.append(f"{label}: {key} must be {expected}, is {props.get(key)!r}")
        if props.get("requiresSession") is True:
            problems.append(f"{label}: requiresSession must be off (the stages do not use sessions)")
        window = _iso_duration(props.get("duplicateDetectionHistoryTimeWindow"))
        if window is None or window < timedelta(minutes=1):
            problems.append(
                f"{label}: duplicateDetectionHistoryTimeWindow must be an ISO duration of at least PT1M"
            )
        lock = _iso_duration(props.get("lockDuration"))
        if lock is None or not timedelta(seconds=30) <= lock <= timedelta(minutes=5):
            problems.append(
                f"{label}: lockDuration must be between PT30S and PT5M, is {props.get('lockDuration')!r}"
            )
        deliveries = props.get("maxDeliveryCount")
        if not isinstance(deliveries, int) or not 1 <= deliveries <= 100:
            problems.append(f"{label}: maxDeliveryCount must be an integer from 1 to 100, is {deliveries!r}")
        if _iso_duration(props.get("defaultMessageTimeToLive")) is None:
            problems.append(f"{label}: defaultMessageTimeToLive must be set (ISO 8601 duration)")
        if not isinstance(props.get("maxSizeInMegabytes"), int):
            problems.append(f"{label}: maxSizeInMegabytes must be set")
    return problems


def check_service_bus(deployment: Deployment) -> list[str]:
    """One Standard (or Premium) namespace, Entra ID only, TLS 1.2."""
    namespaces = deployment.of_type(NAMESPACE_TYPE)
    if len(namespaces) != 1:
        return [f"expected one Service Bus namespace, found {len(namespaces)}"]
    ns = namespaces[0]
    problems = []
    sku = ns.config.get("sku", {})
    if not isinstance(sku, dict) or sku.get("name") not in ("Standard", "Premium"):
        problems.append(f"Service Bus sku must be Standard or Premium (duplicate detection), is {sku!r}")
    if ns.properties.get("disableLocalAuth") is not True:
        problems.append("Service Bus namespace: disableLocalAuth must be true (no SAS keys)")
    if ns.properties.get("minimumTlsVersion") != "1.2":
        problems.append("Service Bus namespace: minimumTlsVersion must be '1.2'")
    return problems


def check_key_vault(deployment: Deployment) -> list[str]:
    """RBAC-only Key Vault with soft delete and purge protection, public access a parameter."""
    vaults = deployment.of_type(VAULT_TYPE)
    if len(vaults) != 1:
        return [f"expected one Key Vault, found {len(vaults)}"]
    vault = vaults[0]
    props = vault.properties
    problems = []
    for key in ("enableRbacAuthorization", "enableSoftDelete", "enablePurgeProtection"):
        if props.get(key) is not True:
            problems.append(f"Key Vault: {key} must be true, is {props.get(key)!r}")
    if "accessPolicies" in props:
        problems.append("Key Vault: accessPolicies must not be set (RBAC authorization only)")
    if props.get("enabledForTemplateDeployment") is True:
        problems.append("Key Vault: enabledForTemplateDeployment must be off")
    raw_access = vault.raw.get("properties", {}).get("publicNetworkAccess")
    if not isinstance(raw_access, BicepElement):
        problems.append("Key Vault: publicNetworkAccess must come from a parameter")
    return problems


def check_storage(deployment: Deployment) -> list[str]:
    """Host storage without shared keys, anonymous blobs or old TLS."""
    accounts = deployment.of_type(STORAGE_TYPE)
    if not accounts:
        return ["no storage account: the Functions host needs one"]
    problems = []
    for account in accounts:
        props = account.properties
        for key, expected in (
            ("allowSharedKeyAccess", False),
            ("allowBlobPublicAccess", False),
            ("minimumTlsVersion", "TLS1_2"),
        ):
            if props.get(key) != expected or props.get(key) is None:
                problems.append(
                    f"storage {account.where()}: {key} must be {expected!r}, is {props.get(key)!r}"
                )
        if props.get("supportsHttpsTrafficOnly") is False:
            problems.append(f"storage {account.where()}: supportsHttpsTrafficOnly must not be false")
    return problems


def check_tables(deployment: Deployment) -> list[str]:
    """The state port's tables exist in the storage account, exactly shared/names.py STATE_TABLES, and
    the app is pointed at that account's Table endpoint."""
    problems = []
    services = deployment.of_type(TABLE_SERVICE_TYPE)
    if len(services) != 1:
        problems.append(f"expected one Table service (tableServices 'default'), found {len(services)}")
    found = tuple(str(table.name) for table in deployment.of_type(TABLE_TYPE))
    if found != names.STATE_TABLES:
        problems.append(f"tables {found} differ from shared/names.py STATE_TABLES {names.STATE_TABLES}")
    for name in found:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{2,62}", name):
            problems.append(f"table {name!r}: Table names are 3-63 letters and digits, starting with a letter")
    try:
        settings = bicep_app_settings(deployment)
    except LookupError:
        return problems
    url = settings.get("LEADWRITER_TABLES_URL")
    if isinstance(url, str):
        # A literal cannot follow the account's name or the cloud's storage suffix.
        problems.append(
            f"app setting LEADWRITER_TABLES_URL must come from the storage account's primaryEndpoints.table, "
            f"not the literal {url!r}"
        )
    elif url is not None and "primaryEndpoints.table" not in str(url):
        problems.append(
            f"app setting LEADWRITER_TABLES_URL must be the storage account's primaryEndpoints.table, is {url}"
        )
    return problems


def _main_template(deployment: Deployment) -> Mapping[str, Any]:
    return deployment.files.get((deployment.infra_dir / "main.bicep").resolve(), {})


def _identifiers(expr: object) -> set[str]:
    """Every identifier an expression mentions, interpolations and function arguments included."""
    if isinstance(expr, str):
        found = set(re.findall(r"[A-Za-z_]\w*", expr)) if "${" in expr or isinstance(expr, BicepElement) else set()
        if isinstance(expr, BicepElement):
            found.add(str(expr))
        return found
    if isinstance(expr, list):
        return set().union(*(_identifiers(item) for item in expr)) if expr else set()
    if isinstance(expr, dict):
        return set().union(*(_identifiers(value) for value in expr.values())) if expr else set()
    return set()


def _depends_on(parsed: Mapping[str, Any], expr: object, seen: frozenset[str] = frozenset()) -> set[str]:
    """The parameters ``expr`` depends on, following variables."""
    params: set[str] = set()
    for name in _identifiers(expr) - seen:
        if name in parsed.get("parameters", {}):
            params.add(name)
        elif name in parsed.get("variables", {}):
            params |= _depends_on(parsed, parsed["variables"][name]["value"], seen | {name})
    return params


def _parameter_file(deployment: Deployment) -> dict[str, object]:
    path = deployment.infra_dir / "main.parameters.json"
    if not path.exists():
        return {}
    parameters = json.loads(path.read_text()).get("parameters", {})
    return {name: entry.get("value") for name, entry in parameters.items()}


def check_key_vault_name(deployment: Deployment) -> list[str]:
    """A second ``azd up`` after ``azd down`` must not collide with the soft-deleted, purge-protected vault:
    the vault's name depends on a generation parameter that azd takes from the environment, so
    ``azd env set`` can move it to a fresh name, and that parameter does not name anything else."""
    parsed = _main_template(deployment)
    module = parsed.get("modules", {}).get("keyVault", {})
    config = module.get("config", {}) if isinstance(module, dict) else {}
    name_expr = config.get("params", {}).get("name") if isinstance(config, dict) else None
    if name_expr is None:
        return ["main.bicep: no keyVault module with a name parameter"]
    standard = {"environmentName", "location", "principalId", "principalType"}
    salts = _depends_on(parsed, name_expr) - standard
    if not salts:
        return [
            "main.bicep: the Key Vault name depends only on the environment and region, so the next `azd up` "
            "after `azd down` collides with the soft-deleted vault for 90 days; derive it from a "
            "generation parameter as well (docs/deploy.md)"
        ]
    problems = []
    file_values = _parameter_file(deployment)
    for salt in sorted(salts):
        value = file_values.get(salt)
        if not (isinstance(value, str) and AZD_ENV_REFERENCE.fullmatch(value.strip())):
            problems.append(
                f"main.parameters.json: {salt} (in the Key Vault name) must come from the azd environment, "
                f"e.g. \"${{LEADWRITER_KEYVAULT_GENERATION=1}}\", so `azd env set` can bump it; is {value!r}"
            )
    # The other resources keep their names across generations (nothing else is soft-deleted this way).
    for symbol, entry in parsed.get("modules", {}).items():
        if symbol == "keyVault" or not isinstance(entry.get("config"), dict):
            continue
        other = entry["config"].get("params", {}).get("name")
        if other is not None and _depends_on(parsed, other) & salts:
            problems.append(f"main.bicep: module {symbol}'s name depends on the Key Vault generation too")
    return problems


def check_admin_key_generation(deployment: Deployment) -> list[str]:
    """azd's first secretOrRandomPassword is 15 characters, and the app refuses admin keys under 32:
    the parameter must accept 15, and what Key Vault stores must be lengthened with fresh entropy."""
    parsed = _main_template(deployment)
    file_values = _parameter_file(deployment)
    module = parsed.get("modules", {}).get("keyVault", {})
    config = module.get("config", {}) if isinstance(module, dict) else {}
    value_expr = config.get("params", {}).get("adminKey") if isinstance(config, dict) else None
    if value_expr is None:
        return ["main.bicep: the keyVault module gets no adminKey"]
    problems = []
    from_azd = {
        name
        for name, value in file_values.items()
        if isinstance(value, str) and "secretOrRandomPassword" in value and name in parsed.get("parameters", {})
    }
    for name in sorted(from_azd):
        minimum = _decorator(parsed["parameters"][name], "min_length")
        if isinstance(minimum, int) and minimum > AZD_RANDOM_PASSWORD_LENGTH:
            problems.append(
                f"main.bicep: param {name} has @minLength({minimum}), but azd's secretOrRandomPassword generates "
                f"{AZD_RANDOM_PASSWORD_LENGTH} characters: the first provision would fail"
            )
    sources = _depends_on(parsed, value_expr)
    if sources & from_azd:
        entropy = {name for name in sources if _is_fresh_secret(parsed["parameters"][name])}
        if not entropy:
            problems.append(
                f"main.bicep: the admin key written to Key Vault is azd's {AZD_RANDOM_PASSWORD_LENGTH}-character "
                f"password as it is, shorter than the {Settings.model_fields['admin_key'].alias} minimum of "
                "32: lengthen a short one with a @secure() parameter that defaults to newGuid()"
            )
    return problems


def _is_fresh_secret(param: Mapping[str, Any]) -> bool:
    """A @secure() parameter that defaults to newGuid(): fresh entropy on every deployment."""
    default = param.get("default")
    secure = any(isinstance(d, dict) and d.get("type") == "secure" for d in param.get("decorators", []))
    return secure and isinstance(default, dict) and default.get("function", {}).get("type") == "new_guid"


def check_funcignore(funcignore: Path) -> list[str]:
    """The deployment package leaves out local state, secrets, tests and tooling."""
    try:
        lines = {line.strip() for line in funcignore.read_text().splitlines()}
    except OSError as exc:
        return [f".funcignore: cannot read it: {exc}"]
    entries = {line for line in lines if line and not line.startswith("#")}
    return [
        f".funcignore: {entry!r} is missing (it would be deployed)"
        for entry in FUNCIGNORE_REQUIRED
        if entry not in entries and entry.rstrip("/") not in entries
    ] + [f".funcignore: {entry!r} would leave out code the app imports" for entry in sorted(entries) if entry in (
        "shared/", "shared", "functions/", "functions", "function_app.py", "host.json", "requirements.txt",
    )]


def check_monitoring(deployment: Deployment) -> list[str]:
    """Workspace-based Application Insights that accepts Entra-authenticated telemetry only."""
    components = deployment.of_type(COMPONENT_TYPE)
    if len(components) != 1:
        return [f"expected one Application Insights component, found {len(components)}"]
    problems = []
    props = components[0].properties
    if props.get("DisableLocalAuth") is not True:
        problems.append("Application Insights: DisableLocalAuth must be true")
    if "WorkspaceResourceId" not in props:
        problems.append("Application Insights: WorkspaceResourceId must point at the Log Analytics workspace")
    if not deployment.of_type("Microsoft.OperationalInsights/workspaces"):
        problems.append("no Log Analytics workspace")
    return problems


def check_function_app(deployment: Deployment) -> list[str]:
    """One Flex Consumption (FC1) Python 3.11 app, user-assigned identity, identity-based deployment."""
    sites = deployment.of_type(SITE_TYPE)
    if len(sites) != 1:
        return [f"expected one Function App, found {len(sites)}"]
    site = sites[0]
    problems = []
    plans = deployment.of_type("Microsoft.Web/serverfarms")
    if not plans or any(p.config.get("sku", {}).get("name") != "FC1" for p in plans):
        problems.append("the App Service plan must be Flex Consumption (sku FC1)")
    kind = str(site.config.get("kind", ""))
    if "functionapp" not in kind or "linux" not in kind:
        problems.append(f"Function App kind must be 'functionapp,linux', is {kind!r}")
    identity = site.config.get("identity", {})
    if not isinstance(identity, dict) or identity.get("type") != "UserAssigned":
        problems.append("Function App identity must be UserAssigned")
    props = site.properties
    if props.get("httpsOnly") is not True:
        problems.append("Function App: httpsOnly must be true")
    if "keyVaultReferenceIdentity" not in props:
        problems.append("Function App: keyVaultReferenceIdentity must name the user-assigned identity")
    config = props.get("functionAppConfig", {})
    config = config if isinstance(config, dict) else {}
    runtime = config.get("runtime", {})
    if not isinstance(runtime, dict) or (runtime.get("name"), runtime.get("version")) not in {
        ("python", version) for version in PYTHON_VERSIONS
    }:
        problems.append(f"functionAppConfig.runtime must be python {' or '.join(PYTHON_VERSIONS)}, is {runtime!r}")
    problems.extend(_check_python_parameters(deployment))
    storage = (
        config.get("deployment", {}).get("storage", {}) if isinstance(config.get("deployment"), dict) else {}
    )
    auth = storage.get("authentication", {}) if isinstance(storage, dict) else {}
    if not isinstance(auth, dict) or auth.get("type") not in (
        "UserAssignedIdentity",
        "SystemAssignedIdentity",
    ):
        problems.append("the deployment storage container must be reached with a managed identity")
    scale = config.get("scaleAndConcurrency", {})
    scale = scale if isinstance(scale, dict) else {}
    if scale.get("instanceMemoryMB") not in (512, 2048, 4096):
        problems.append(f"instanceMemoryMB must be 512, 2048 or 4096, is {scale.get('instanceMemoryMB')!r}")
    raw_scale = site.raw.get("properties", {}).get("functionAppConfig", {}).get("scaleAndConcurrency", {})
    if not isinstance(raw_scale.get("maximumInstanceCount"), BicepElement):
        problems.append("maximumInstanceCount must come from a parameter")
    instances = scale.get("maximumInstanceCount")
    if not isinstance(instances, int) or not 1 <= instances <= 1000:
        problems.append(f"maximumInstanceCount must be from 1 to 1000, is {instances!r}")
    tags = site.config.get("tags", {})
    if not isinstance(tags, dict) or tags.get("azd-service-name") != "api":
        problems.append("the Function App must carry the tag azd-service-name: api (azure.yaml's service)")
    for policy in deployment.of_type("Microsoft.Web/sites/basicPublishingCredentialsPolicies"):
        if policy.properties.get("allow") is not False:
            problems.append(f"basic publishing credentials '{policy.name}' must be disabled")
    return problems


def _decorator(param: Mapping[str, Any], kind: str) -> object:
    for decorator in param.get("decorators", []):
        if isinstance(decorator, dict) and decorator.get("type") == kind:
            return decorator.get("argument")
    return None


def _check_python_parameters(deployment: Deployment) -> list[str]:
    """Every Bicep parameter that carries the Python version offers exactly 3.11 and 3.12, default 3.11."""
    problems = []
    found = False
    for path, parsed in deployment.files.items():
        for name, param in parsed.get("parameters", {}).items():
            if name not in ("pythonVersion", "runtimeVersion"):
                continue
            found = True
            allowed = _decorator(param, "allowed")
            if not isinstance(allowed, list) or tuple(str(v) for v in allowed) != PYTHON_VERSIONS:
                problems.append(f"{path.name}: param {name} must be @allowed({list(PYTHON_VERSIONS)}), is {allowed!r}")
            if param.get("default") != DEFAULT_PYTHON_VERSION:
                problems.append(
                    f"{path.name}: param {name} must default to {DEFAULT_PYTHON_VERSION}, is {param.get('default')!r}"
                )
    if not found:
        problems.append("no pythonVersion/runtimeVersion parameter: the Python version must be a parameter")
    return problems


def check_app_settings(deployment: Deployment) -> list[str]:
    """Every stable setting of architecture §8 wired for Azure; LEADWRITER_* names are Settings aliases."""
    try:
        settings = bicep_app_settings(deployment)
    except LookupError as exc:
        return [str(exc)]
    problems = []
    connection = names.SERVICEBUS_CONNECTION
    exact = {
        "LEADWRITER_QUEUE_BACKEND": "servicebus",
        "LEADWRITER_SECRET_BACKEND": "keyvault",
        "LEADWRITER_CRM_ALLOWED_HOSTS": "",
        "LEADWRITER_WEBHOOK_ALLOWED_HOSTS": "",
        "LEADWRITER_STATE_BACKEND": "tables",
        f"{connection}__credential": "managedidentity",
        "AzureWebJobsStorage__credential": "managedidentity",
    }
    for key, expected in exact.items():
        if settings.get(key) != expected:
            problems.append(f"app setting {key} must be {expected!r}, is {settings.get(key, '<missing>')!r}")
    required = (
        "KEYVAULT_URL",
        "LEADWRITER_ADMIN_KEY",
        "LEADWRITER_TABLES_URL",
        "LEADWRITER_SOLUTION_NAME",
        "LEADWRITER_MIN_SOLUTION_VERSION",
        f"{connection}__fullyQualifiedNamespace",
        f"{connection}__clientId",
        "AzureWebJobsStorage__accountName",
        "AzureWebJobsStorage__clientId",
        "AZURE_CLIENT_ID",
        "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    )
    problems.extend(f"app setting {key} is missing" for key in required if key not in settings)
    if not str(settings.get("LEADWRITER_ADMIN_KEY", "")).startswith(KEY_VAULT_REFERENCE):
        problems.append(
            f"app setting LEADWRITER_ADMIN_KEY must be a Key Vault reference ({KEY_VAULT_REFERENCE}...)"
        )
    if "Authorization=AAD" not in str(settings.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "")):
        problems.append("app setting APPLICATIONINSIGHTS_AUTHENTICATION_STRING must use Authorization=AAD")
    aliases = {f.alias for f in Settings.model_fields.values() if f.alias}
    unknown = sorted(key for key in settings if key.startswith("LEADWRITER_") and key not in aliases)
    problems.extend(f"app setting {key} is not a setting of shared/settings.Settings" for key in unknown)
    if "LEADWRITER_TABLES_CONNECTION_STRING" in settings:
        problems.append(
            "app setting LEADWRITER_TABLES_CONNECTION_STRING is for Azurite; in Azure use LEADWRITER_TABLES_URL"
        )
    # The literal values must also be values Settings accepts, or the app would fail at start. Key
    # Vault references are resolved by the host before the app reads them; Settings refuses the
    # literal reference, as it should when the host could not resolve it.
    literal = {
        key: value
        for key, value in settings.items()
        if key in aliases and isinstance(value, str) and not value.startswith(KEY_VAULT_REFERENCE)
    }
    for key, placeholder in (
        ("KEYVAULT_URL", "https://resolved-at-deployment.vault.azure.net"),
        (f"{connection}__fullyQualifiedNamespace", "resolved-at-deployment.servicebus.windows.net"),
        ("LEADWRITER_TABLES_URL", "https://resolved-at-deployment.table.core.windows.net"),
    ):
        literal.setdefault(key, placeholder)
    try:
        Settings.from_env(literal)
    except Exception as exc:
        problems.append(f"app settings would not start the app: {exc}")
    return problems


def _queue_access_needed() -> dict[str, set[str]]:
    """Queue → roles the app identity needs, from the pipeline (architecture §2, §5, §6)."""
    needed: dict[str, set[str]] = {queue: set() for queue in names.SERVICE_BUS_QUEUES}
    needed[names.QUEUE_INCOMING].add(SB_DATA_SENDER)  # HTTP ingest
    needed[names.QUEUE_JOBS].update({SB_DATA_RECEIVER, SB_DATA_SENDER})  # run_job; the API queues a job's first step
    for position, queue in enumerate(names.STAGE_QUEUES):
        needed[queue].add(SB_DATA_RECEIVER)  # the stage's trigger; the API's dead-letter list/replay/purge
        needed[queue].add(SB_DATA_SENDER)  # a retry is rescheduled onto the same queue; replay
        if position + 1 < len(names.STAGE_QUEUES):
            needed[names.STAGE_QUEUES[position + 1]].add(SB_DATA_SENDER)  # forward to the next stage
    return needed


def check_rbac(deployment: Deployment) -> list[str]:
    """Least privilege: only allowed roles at allowed scopes, named by guid(), and all that is needed."""
    problems = []
    granted: set[tuple[str, str, str]] = set()
    for assignment in deployment.of_type(ROLE_ASSIGNMENT_TYPE):
        label = assignment.where()
        if assignment.file.name != "rbac.bicep":
            problems.append(f"{label}: role assignments belong in infra/app/rbac.bicep")
        raw_name = assignment.raw.get("name")
        if not (isinstance(raw_name, dict) and raw_name.get("function", {}).get("type") == "guid"):
            problems.append(f"{label}: name the role assignment with guid(scope, principal, role)")
        match = GUID.search(str(assignment.properties.get("roleDefinitionId", "")))
        if not match:
            problems.append(f"{label}: role definition id is not a literal built-in role id")
            continue
        role = match.group(0).lower()
        role_name = ROLE_NAMES.get(role, role)
        scope = assignment.config.get("scope")
        scope_type = scope.type if isinstance(scope, ResourceRef) else "resource group"
        scope_name = str(scope.name) if isinstance(scope, ResourceRef) else ""
        allowed = ALLOWED_ROLE_SCOPES.get(role)
        if allowed is None:
            problems.append(f"{label}: role {role_name} is not on the least-privilege list")
        elif scope_type not in allowed:
            where = "the namespace" if scope_type == NAMESPACE_TYPE else scope_type
            problems.append(f"{label}: {role_name} granted on {where}; allowed only on {sorted(allowed)}")
        if not assignment.properties.get("principalType"):
            problems.append(f"{label}: set principalType (avoids replication-delay failures)")
        granted.add((role, scope_type, scope_name))
    for queue, roles in _queue_access_needed().items():
        for role in sorted(roles):
            if (role, QUEUE_TYPE, queue) not in granted:
                problems.append(f"missing {ROLE_NAMES[role]} on queue {queue}")
        if (SB_DATA_OWNER, QUEUE_TYPE, queue) not in granted:
            problems.append(
                f"missing {ROLE_NAMES[SB_DATA_OWNER]} on queue {queue}: the scale controller needs Manage "
                "rights to read the queue length for target-based scaling"
            )
    for table in names.STATE_TABLES:
        if (STORAGE_TABLE_DATA_CONTRIBUTOR, TABLE_TYPE, table) not in granted:
            problems.append(f"missing {ROLE_NAMES[STORAGE_TABLE_DATA_CONTRIBUTOR]} on table {table}")
    for role, scope_type in (
        (KV_SECRETS_OFFICER, VAULT_TYPE),
        (STORAGE_BLOB_DATA_OWNER, STORAGE_TYPE),
        (MONITORING_METRICS_PUBLISHER, COMPONENT_TYPE),
    ):
        if not any(g[0] == role and g[1] == scope_type for g in granted):
            problems.append(f"missing {ROLE_NAMES[role]} on the {scope_type}")
    return problems


def _secure_params(parsed: Mapping[str, Any]) -> set[str]:
    return {
        name
        for name, param in parsed.get("parameters", {}).items()
        if any(d.get("type") == "secure" for d in param.get("decorators", []) if isinstance(d, dict))
    }


def _references(expr: object) -> Iterator[str]:
    if isinstance(expr, BicepElement):
        yield str(expr)
    elif isinstance(expr, str):
        yield from (m.split(".")[0].strip() for m in re.findall(r"\$\{([^{}]*)\}", expr))
    elif isinstance(expr, list):
        for item in expr:
            yield from _references(item)
    elif isinstance(expr, dict):
        for value in expr.values():
            yield from _references(value)


def check_no_secrets(deployment: Deployment) -> list[str]:
    """No keys, SAS or connection strings anywhere; secrets only in Key Vault, never in outputs."""
    problems = []
    for path in sorted(deployment.infra_dir.rglob("*")):
        if path.suffix not in (".bicep", ".json", ".bicepparam") or not path.is_file():
            continue
        text = path.read_text()
        for needle in FORBIDDEN_TEXT:
            if needle.lower() in text.lower():
                problems.append(f"{path.name}: contains {needle!r} (a key or connection string)")
    for resource in deployment.resources:
        if resource.type in FORBIDDEN_TYPES:
            problems.append(f"{resource.where()}: {resource.type} hands out SAS keys")
    for path, parsed in deployment.files.items():
        secure = _secure_params(parsed)
        for name, output in parsed.get("outputs", {}).items():
            leaked = secure.intersection(_references(output.get("value")))
            if leaked:
                problems.append(f"{path.name}: output {name} exposes secure parameter {sorted(leaked)}")
            if output.get("type") == "securestring" or re.search(r"(password|secret$|key$)", name, re.I):
                problems.append(
                    f"{path.name}: output {name} looks like a secret; outputs carry names and endpoints"
                )
        for name in secure:
            default = parsed["parameters"][name].get("default")
            if isinstance(default, str) and default:
                problems.append(f"{path.name}: secure parameter {name} has a literal default")
    for secret in deployment.of_type(SECRET_TYPE):
        raw_value = secret.raw.get("properties", {}).get("value")
        secure = _secure_params(deployment.files[secret.file])
        if not (isinstance(raw_value, BicepElement) and str(raw_value) in secure):
            problems.append(
                f"{secret.where()}: a Key Vault secret's value must come from a @secure() parameter"
            )
    try:
        settings = bicep_app_settings(deployment)
    except LookupError:
        settings = {}
    for key, value in settings.items():
        text = str(value)
        if key in ALLOWED_CONNECTION_STRING_SETTINGS:
            continue
        if key == names.SERVICEBUS_CONNECTION or "CONNECTION_STRING" in key.upper():
            problems.append(f"app setting {key} is a connection string; use identity-based settings")
        elif SECRET_LIKE_SETTING.search(key) and not text.startswith(KEY_VAULT_REFERENCE):
            problems.append(f"app setting {key} holds a secret in plain text; use a Key Vault reference")
    return problems


def check_suppressions(infra_dir: Path) -> list[str]:
    """Every ``checkov:skip`` names its checks and gives a real reason."""
    problems = []
    for path in sorted(infra_dir.rglob("*.bicep")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = SKIP_COMMENT.search(line)
            if not match:
                continue
            checks, reason = match.group(1), (match.group(2) or "").strip()
            if not checks:
                problems.append(f"{path.name}:{number}: checkov:skip without a check id")
            elif "," in checks:
                # checkov's Bicep runner takes the whole list as one unknown id and skips nothing.
                problems.append(f"{path.name}:{number}: one check id per checkov:skip line, not {checks}")
            if len(reason) < MIN_REASON_LENGTH:
                problems.append(f"{path.name}:{number}: checkov:skip={checks} without a reason (`: why`)")
    return problems


def check_host_json(deployment: Deployment, host_json: Path) -> list[str]:
    """host.json's Service Bus settings agree with the queues' locks and the function timeout."""
    host = json.loads(host_json.read_text())
    bus = host.get("extensions", {}).get("serviceBus", {})
    problems = []
    if bus.get("autoCompleteMessages") is not False:
        problems.append(
            "host.json: extensions.serviceBus.autoCompleteMessages must be false (the stages settle)"
        )
    renewal = _timespan(bus.get("maxAutoLockRenewalDuration"))
    timeout = _timespan(host.get("functionTimeout"))
    if renewal is None:
        problems.append("host.json: extensions.serviceBus.maxAutoLockRenewalDuration must be a timespan")
    if timeout is None:
        problems.append("host.json: functionTimeout must be set (hh:mm:ss)")
    if renewal is not None and timeout is not None and renewal < timeout:
        problems.append(
            f"host.json: maxAutoLockRenewalDuration {renewal} is shorter than functionTimeout {timeout}: "
            "a long run would lose its lock and the lead be delivered twice"
        )
    calls = bus.get("maxConcurrentCalls")
    if not isinstance(calls, int) or calls < 1:
        problems.append("host.json: extensions.serviceBus.maxConcurrentCalls must be a positive integer")
    defaults = Settings()
    one_request = timedelta(seconds=defaults.crm_connect_timeout + defaults.crm_read_timeout)
    batch_size = bus.get("maxMessageBatchSize", 1000)
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append("host.json: extensions.serviceBus.maxMessageBatchSize must be a positive integer")
        batch_size = 1000
    write_batch = worst_case_write_batch(batch_size, defaults.max_batch, one_request)
    for queue in deployment.of_type(QUEUE_TYPE):
        lock = _iso_duration(queue.properties.get("lockDuration"))
        if lock is None:
            continue
        if renewal is not None and lock > renewal:
            problems.append(
                f"queue {queue.name}: lockDuration {lock} exceeds host.json "
                f"maxAutoLockRenewalDuration {renewal}"
            )
        if lock <= one_request:
            problems.append(
                f"queue {queue.name}: lockDuration {lock} does not outlast one CRM request "
                f"(connect + read timeout {one_request})"
            )
        if queue.name == names.QUEUE_READY and lock < write_batch:
            problems.append(
                f"queue {queue.name}: lockDuration {lock} does not fit the worst-case write batch {write_batch} "
                f"(host.json maxMessageBatchSize {batch_size} as $batch requests of up to {defaults.max_batch}, "
                f"each with a fresh-token retry, {one_request} per request, plus settling): host.json lock "
                "renewal does not apply to batches"
            )
        wait = _timespan(bus.get("maxBatchWaitTime")) if "maxBatchWaitTime" in bus else None
        if wait is not None and wait > lock / 2:
            problems.append(f"host.json: maxBatchWaitTime {wait} exceeds half of queue {queue.name}'s lock {lock}")
    return problems


def worst_case_write_batch(batch_size: int, max_batch: int, one_request: timedelta) -> timedelta:
    """How long the write stage may hold one batch of ``batch_size`` messages of one publisher: its
    ``$batch`` requests of up to ``max_batch`` leads one after another, each tried twice (the second
    time after a fresh token, which is one more request), then settling every message."""
    chunks = math.ceil(batch_size / max_batch)
    return chunks * 2 * one_request + one_request + batch_size * SETTLE_PER_MESSAGE


def check_azure_yaml(azure_yaml: Path) -> list[str]:
    """azd's service map: service ``api`` is the Python Functions app at the repository root."""
    try:
        document = yaml.safe_load(azure_yaml.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return [f"azure.yaml: cannot read it: {exc}"]
    api = (document or {}).get("services", {}).get("api")
    if not isinstance(api, dict):
        return ["azure.yaml: no service 'api'"]
    problems = []
    for key, allowed in (("language", ("python", "py")), ("host", ("function",)), ("project", (".", "./"))):
        if api.get(key) not in allowed:
            problems.append(f"azure.yaml: services.api.{key} must be {allowed[0]!r}, is {api.get(key)!r}")
    return problems


def run_all(root: Path = REPO_ROOT) -> list[str]:
    """Every offline check except checkov, on the repository (or a copy) at ``root``."""
    try:
        deployment = load_deployment(root / "infra")
    except (ValueError, OSError) as exc:
        return [f"infra/ does not parse: {exc}"]
    problems: list[str] = []
    for check in (
        check_parsing,
        check_queues,
        check_service_bus,
        check_key_vault,
        check_storage,
        check_tables,
        check_key_vault_name,
        check_admin_key_generation,
        check_monitoring,
        check_function_app,
        check_app_settings,
        check_rbac,
        check_no_secrets,
    ):
        problems.extend(check(deployment))
    problems.extend(check_suppressions(root / "infra"))
    problems.extend(check_host_json(deployment, root / "host.json"))
    problems.extend(check_azure_yaml(root / "azure.yaml"))
    problems.extend(check_funcignore(root / ".funcignore"))
    return problems


def run_checkov(infra_dir: Path, checkov: Path = CHECKOV) -> list[str]:
    """Run checkov on ``infra_dir`` offline; every failed check not suppressed with a reason is a problem.

    Raises FileNotFoundError when checkov is not installed (``make infra-check`` installs it).
    """
    if not checkov.exists():
        raise FileNotFoundError(f"{checkov} (run `make infra-check` to install it)")
    command = [
        str(checkov),
        "-d",
        str(infra_dir),
        "--framework",
        "bicep",
        "--skip-download",
        "--compact",
        "--quiet",
        "-o",
        "json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if result.returncode not in (0, 1):
        return [f"checkov failed ({result.returncode}): {result.stderr.strip()[-2000:]}"]
    try:
        reports = json.loads(result.stdout)
    except json.JSONDecodeError:
        return [f"checkov printed no JSON report: {result.stdout.strip()[-2000:]}"]
    problems = []
    for report in reports if isinstance(reports, list) else [reports]:
        summary = report.get("summary", {})
        if summary.get("parsing_errors"):
            problems.append(f"checkov could not parse {summary['parsing_errors']} file(s)")
        if not summary.get("resource_count"):
            problems.append("checkov found no Bicep resources to check")
        for failed in report.get("results", {}).get("failed_checks", []):
            lines = failed.get("file_line_range") or []
            span = f":{lines[0]}-{lines[1]}" if len(lines) == 2 else ""
            check_id = failed["check_id"]
            problems.append(
                f"checkov {check_id} ({failed.get('check_name')}) failed for {failed.get('resource')} "
                f"at {failed.get('file_path')}{span}: fix it, or justify it with "
                f"`// checkov:skip={check_id}: reason`"
            )
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``make infra-check``: print every problem and return 1 if there is any."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=REPO_ROOT)
    parser.add_argument("--no-checkov", action="store_true", help="skip checkov (pycep checks only)")
    parser.add_argument("--checkov", type=Path, default=CHECKOV, help="the checkov executable")
    options = parser.parse_args(argv)
    problems = run_all(options.root)
    if not options.no_checkov:
        problems.extend(run_checkov(options.root / "infra", options.checkov))
    for problem in problems:
        print(f"infra-check: {problem}")
    print(f"infra-check: {'FAILED' if problems else 'ok'} ({len(problems)} problem(s))")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
