"""ops/grafana-dashboard.json against Grafana's dashboard schema.

No offline validator of that schema installs with pip: grafana-foundation-sdk (PyPI, Apache-2.0) has the
generated models, but its `Dashboard.from_json` copies the fields it knows without checking a type or a bound.
So this test checks the constraints that Grafana's own schema states, as written in grafana/grafana
`kinds/dashboard/dashboard_kind.cue` (the version read: commit 00139e84396be1600192135b87b8607f3f7b79d0),
schema 0.0: the dashboard's fields and types, `#DashboardCursorSync`, `#Panel` (a non-empty `type`, `id`
uint32, `targets` a list of objects, `datasource` {type?, uid?}, `fieldConfig` {defaults, overrides},
`options` an object), `#GridPos` (h > 0, 0 < w <= 24, 0 <= x < 24, y >= 0; uint32), `#VariableModel`'s
`type` and `name`, `#AnnotationQuery`'s required `name`, `datasource`, `enable`, `iconColor`. A check of the
checker: a dashboard that breaks each rule is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana-dashboard.json"
UINT32 = (1 << 32) - 1
VARIABLE_TYPES = {"query", "adhoc", "constant", "datasource", "interval", "textbox", "custom", "system"}


def _is_uint(value: Any, top: int = UINT32) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= top


def _datasource(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict) or set(value) - {"type", "uid"}:
        return [f"{where}: datasource must be {{type?, uid?}}, got {value!r}"]
    return [f"{where}: datasource.{k} must be a string" for k, v in value.items() if not isinstance(v, str)]


def _grid(pos: Any, where: str) -> list[str]:
    if not isinstance(pos, dict) or not all(_is_uint(pos.get(k)) for k in ("h", "w", "x", "y")):
        return [f"{where}: gridPos needs h, w, x, y as uint32, got {pos!r}"]
    errors = []
    if not pos["h"] > 0:
        errors.append(f"{where}: gridPos.h must be > 0")
    if not 0 < pos["w"] <= 24:
        errors.append(f"{where}: gridPos.w must be in 1..24")
    if not pos["x"] < 24:
        errors.append(f"{where}: gridPos.x must be < 24")
    return errors


def _panel(p: Any) -> list[str]:
    if not isinstance(p, dict):
        return [f"panel {p!r} is not an object"]
    where = f"panel {p.get('id')} ({p.get('title')!r})"
    errors = []
    if not isinstance(p.get("type"), str) or not p["type"]:
        errors.append(f"{where}: type must be a non-empty string")
    if "id" in p and not _is_uint(p["id"]):
        errors.append(f"{where}: id must be a uint32")
    for key in ("title", "description", "interval", "timeFrom", "timeShift", "pluginVersion", "repeat"):
        if key in p and not isinstance(p[key], str):
            errors.append(f"{where}: {key} must be a string")
    if "targets" in p and not (isinstance(p["targets"], list) and all(isinstance(t, dict) for t in p["targets"])):
        errors.append(f"{where}: targets must be a list of objects")
    if "datasource" in p:
        errors += _datasource(p["datasource"], where)
    for t in p.get("targets") or []:
        if isinstance(t, dict) and "datasource" in t:
            errors += _datasource(t["datasource"], f"{where} target {t.get('refId')}")
    if "gridPos" in p:
        errors += _grid(p["gridPos"], where)
    if "options" in p and not isinstance(p["options"], dict):
        errors.append(f"{where}: options must be an object")
    if "transformations" in p and not isinstance(p["transformations"], list):
        errors.append(f"{where}: transformations must be a list")
    if "fieldConfig" in p:
        fc = p["fieldConfig"]
        shaped = isinstance(fc, dict) and isinstance(fc.get("defaults"), dict)
        if not (shaped and isinstance(fc.get("overrides"), list)):
            errors.append(f"{where}: fieldConfig must be {{defaults: object, overrides: list}}")
    if "repeatDirection" in p and p["repeatDirection"] not in ("h", "v"):
        errors.append(f"{where}: repeatDirection must be h or v")
    if p.get("type") == "row":
        if not _is_uint(p.get("id")) or not isinstance(p.get("panels"), list):
            errors.append(f"{where}: a row needs id and panels")
        for inner in p.get("panels") or []:
            errors += _panel(inner)
    return errors


def grafana_schema_errors(d: Any) -> list[str]:
    """What in `d` breaks dashboard_kind.cue's schema 0.0 (empty: nothing)."""
    if not isinstance(d, dict):
        return ["a dashboard is a JSON object"]
    errors = []
    for key, check in (("id", lambda v: isinstance(v, int) and not isinstance(v, bool)),
                       ("uid", lambda v: isinstance(v, str) and 8 <= len(v) <= 40),  # "string (8-40)", its comment
                       ("title", lambda v: isinstance(v, str)), ("description", lambda v: isinstance(v, str)),
                       ("tags", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
                       ("style", lambda v: v in ("light", "dark")), ("timezone", lambda v: isinstance(v, str)),
                       ("editable", lambda v: isinstance(v, bool)), ("graphTooltip", lambda v: v in (0, 1, 2)),
                       ("fiscalYearStartMonth", lambda v: _is_uint(v, 11)), ("liveNow", lambda v: isinstance(v, bool)),
                       ("refresh", lambda v: isinstance(v, str) or v is False),
                       ("version", lambda v: _is_uint(v)), ("panels", lambda v: isinstance(v, list))):  # fmt: skip
        if key in d and not check(d[key]):
            errors.append(f"dashboard.{key} = {d[key]!r} breaks the schema")
    if not _is_uint(d.get("schemaVersion"), (1 << 16) - 1):
        errors.append(f"dashboard.schemaVersion must be a uint16, got {d.get('schemaVersion')!r}")
    time = d.get("time", {})
    if not (isinstance(time, dict) and all(isinstance(time.get(k, ""), str) for k in ("from", "to"))):
        errors.append("dashboard.time must be {from: string, to: string}")
    for v in (d.get("templating") or {}).get("list") or []:
        if not (isinstance(v, dict) and v.get("type") in VARIABLE_TYPES and isinstance(v.get("name"), str)):
            errors.append(f"templating variable {v!r} needs a name and a type in {sorted(VARIABLE_TYPES)}")
    for a in (d.get("annotations") or {}).get("list") or []:
        if not (isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("enable", True), bool)
                and isinstance(a.get("iconColor"), str) and isinstance(a.get("datasource"), dict)):  # fmt: skip
            errors.append(f"annotation {a!r} needs name, datasource, enable and iconColor")
    for p in d.get("panels") or []:
        errors += _panel(p)
    return errors


def test_the_dashboard_meets_grafanas_dashboard_schema() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert grafana_schema_errors(dashboard) == []
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    ("path", "value", "said"),
    [
        (("schemaVersion",), -1, "schemaVersion"),
        (("graphTooltip",), 3, "graphTooltip"),
        (("editable",), "yes", "editable"),
        (("panels", 0, "type"), "", "type must be a non-empty string"),
        (("panels", 0, "gridPos", "w"), 25, "gridPos.w"),
        (("panels", 0, "gridPos", "h"), 0, "gridPos.h"),
        (("panels", 0, "gridPos", "x"), 24, "gridPos.x"),
        (("panels", 0, "id"), -2, "id must be a uint32"),
        (("panels", 0, "targets"), {"expr": "x"}, "targets must be a list"),
        (("panels", 0, "datasource"), "prometheus", "datasource must be"),
        (("panels", 0, "fieldConfig"), {"defaults": {}}, "fieldConfig"),
        (("templating", "list", 0, "type"), "dropdown", "templating variable"),
    ],
)
def test_the_schema_check_refuses_a_dashboard_that_breaks_it(path: tuple[Any, ...], value: Any, said: str) -> None:
    broken = copy.deepcopy(json.loads(DASHBOARD.read_text()))
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(said in e for e in grafana_schema_errors(broken)), grafana_schema_errors(broken)
