"""docs/design.md states contracts that other programs rely on; this keeps it and the
code in agreement, in both directions (a name added to either side alone fails):

- metric names (and, for the engine, their label names) of the engine's and the
  router's /metrics;
- the HTTP endpoints of the engine and the router;
- the request body fields the engine reads, and the error codes it answers with.

The code side is read from the code itself: the live Prometheus registries, and the
route, field and error-code literals of the server modules (parsed with ``ast``, so a
new ``bad(..., "some_code")`` or ``body.get("field")`` shows up here by itself).
The operator -> engine environment is kept by tests/operator/test_engine_contract.py.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "design.md"
SERVER = ROOT / "engine" / "pensieve" / "engine" / "server"
ENGINE = ROOT / "engine" / "pensieve" / "engine"
ROUTER = ROOT / "router" / "pensieve" / "router"


# ---------------------------------------------------------------- the document
def section(title: str) -> str:
    """The text of the section whose heading is ``title`` (up to the next heading of its level or above)."""
    text = DOC.read_text()
    m = re.search(rf"^(#+) {re.escape(title)}\s*$", text, re.M)
    assert m, f"docs/design.md has no section {title!r}"
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, m.end())
    return text[m.end(): end.start() if end else len(text)]


def table_column(text: str, col: int) -> list[str]:
    """The backticked values in column ``col`` of the markdown tables of ``text``."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        if len(cells) > col and not set(cells[col]) <= set("-: "):
            out += re.findall(r"`([^`]+)`", cells[col])
    return out


def doc_metrics(title: str) -> dict[str, set[str]]:
    rows = {}
    for line in section(title).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("|") and cells and cells[0].startswith(("`pensieve_", "`vllm:")):
            rows[cells[0].strip("`")] = set(re.findall(r"`([^`]+)`", cells[2])) if len(cells) > 2 else set()
    return rows


# ---------------------------------------------------------------- the code
def exposed(registry) -> dict[str, set[str]]:
    """Metric names as scraped (counters with _total, info with _info) and their label names."""
    out = {}
    for fam in registry.collect():
        name = fam.name + {"counter": "_total", "info": "_info"}.get(fam.type, "")
        labels = {k for s in fam.samples for k in s.labels if k != "le"}
        out[name] = labels
    return out


def calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            yield (f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None), node


def const(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def strings(node, loops: dict[str, list[str]] | None = None) -> list[str]:
    """The string literals an argument can evaluate to: a constant, either branch of
    ``a if c else b``, the operands of ``x or "y"``, or a loop variable over a tuple of constants."""
    if const(node):
        return [const(node)]
    if isinstance(node, ast.IfExp):
        return strings(node.body, loops) + strings(node.orelse, loops)
    if isinstance(node, ast.BoolOp):
        return [v for x in node.values for v in strings(x, loops)]
    if isinstance(node, ast.Name) and loops and node.id in loops:
        return loops[node.id]
    return []


def loop_constants(path: Path) -> dict[str, list[str]]:
    """``for name in ("a", "b")`` -> {"name": ["a", "b"]}."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            out[node.target.id] = [const(e) for e in node.iter.elts if const(e)]
    return out


def routes(path: Path) -> set[tuple[str, str]]:
    out = set()
    for name, node in calls(path):
        m = re.fullmatch(r"add_(get|post|delete|route)", name or "")
        if m and node.args:
            if m.group(1) == "route":
                out.add((const(node.args[0]), const(node.args[1])))
            else:
                out.add((m.group(1).upper(), const(node.args[0])))
    return out


# Where each error helper takes its code: positional index (or the keyword ``code``).
CODE_ARG = {"APIError": 4, "bad": 2, "InvalidRequestError": 2, "fail": 2, "error_response": 2}


def error_codes(*paths: Path) -> set[str]:
    out = set()
    for path in paths:
        for name, node in calls(path):
            if name not in CODE_ARG:
                continue
            i = CODE_ARG[name]
            arg = next((k.value for k in node.keywords if k.arg == "code"), None)
            if arg is None and len(node.args) > i:
                arg = node.args[i]
            if arg is not None:
                out.update(strings(arg))
        for node in ast.walk(ast.parse(path.read_text())):  # error bodies written out as literals
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if isinstance(k, ast.Constant) and k.value == "code" and isinstance(v, ast.Constant) \
                            and isinstance(v.value, str):
                        out.add(v.value)
    return out


def body_fields(path: Path) -> set[str]:
    out, loops = set(), loop_constants(path)
    for name, node in calls(path):
        recv = node.func.value if isinstance(node.func, ast.Attribute) else None
        if name == "get" and isinstance(recv, ast.Name) and recv.id == "body" and node.args:
            out.update(strings(node.args[0], loops))
        elif name in ("get_int", "get_num", "get_bool", "get_str") and len(node.args) > 1 \
                and isinstance(node.args[0], ast.Name) and node.args[0].id == "body":
            out.update(strings(node.args[1], loops))
    return out


# ---------------------------------------------------------------- the agreements
def test_engine_metrics():
    from pensieve.engine.server.metrics import ServerMetrics
    from pensieve.engine.server.snapshot import EngineSnapshot

    code = exposed(ServerMetrics(EngineSnapshot, {"model": "m", "block_size": "32", "gpu_blocks": "1",
                                                  "cpu_blocks": "1", "cache_mode": "pensieve"}).registry)
    doc = doc_metrics("Engine metrics")
    assert set(doc) == set(code), f"only in the doc: {set(doc) - set(code)}; only in the code: {set(code) - set(doc)}"
    for name, labels in code.items():
        assert doc[name] == labels, (name, doc[name], labels)


def test_router_metrics():
    from pensieve.router.metrics import RouterMetrics

    code = set(exposed(RouterMetrics().registry))
    doc = set(doc_metrics("Router metrics"))
    assert doc == code, f"only in the doc: {doc - code}; only in the code: {code - doc}"


@pytest.mark.parametrize("title, path", [("Engine endpoints", SERVER / "app.py"),
                                         ("Router endpoints", ROUTER / "app.py")])
def test_endpoints(title, path):
    text = section(title)
    doc = set(zip(table_column(text, 0), table_column(text, 1)))
    assert doc == routes(path), f"only in the doc: {doc - routes(path)}; only in the code: {routes(path) - doc}"


def test_request_fields():
    doc = set(table_column(section("Request fields"), 0))
    code = body_fields(SERVER / "protocol.py")
    assert doc == code, f"only in the doc: {doc - code}; only in the code: {code - doc}"


def test_error_codes():
    doc = set(table_column(section("Errors"), 1))
    code = error_codes(SERVER / "protocol.py", SERVER / "app.py", ENGINE / "sampling.py", ENGINE / "engine.py",
                       ROUTER / "app.py", SERVER / "listener.py", SERVER / "conversations.py")
    assert doc == code, f"only in the doc: {doc - code}; only in the code: {code - doc}"


def test_nothing_refers_to_the_old_location():
    tracked = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and p.suffix in
               (".py", ".md", ".sh", ".yaml", ".toml", ".txt", ".ini", ".json", ".tpl") and "results" not in p.parts]
    old = "../" + "shared"
    assert not [str(p) for p in tracked if old in p.read_text(errors="ignore")]
