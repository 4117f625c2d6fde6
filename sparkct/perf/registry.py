"""The benchmark files' own declarations. Imports no torch.

Adding a benchmark is one file: each ``benchmarks/bench_<family>.py`` declares its suite, the ratio
pairs the regression gate reads and its subsets of cases in one module-level table ``BENCH`` of
literals (read here with ``ast.literal_eval``, never imported, so a name or an expression in it is an
error)::

    BENCH = {
        "suite": "kernels",                   # required: what `sparkct bench --suite` runs it under
        "pairs": [                            # optional: the ratios (see sparkct.perf.report)
            {"case": {"test": "test_info_nce", "impl": "fused"}, "base": {"impl": "naive"},
             "label": "naive", "memory": True},
        ],
        "default": [("test_info_nce", "cpu-fp32-2N8192-*")],  # optional: CPU cases of the default run
        "quick": [("test_info_nce", "cpu-fp32-2N2048-*")],    # optional: the smoke subset (--quick)
    }

pairs: a case matching ``case`` (and not ``base``) is compared with the one case of its
pytest-benchmark group that matches ``base`` and agrees with it on every other pytest parameter the two
share; selectors match pytest parameters and "test" (the test function's name). Each gives
``speedup_vs_<label>``, and with ``"memory": True`` also ``mem_vs_<label>``.

default and quick: ``(test function, parameter-id pattern)`` (fnmatch; "" for an unparametrized test).
The default run (``pytest benchmarks``, ``sparkct bench``) keeps every CUDA case and the CPU cases
``default`` lists; a file with no ``default`` entries runs whole. ``--quick`` (``--bench-quick``) runs
only the cases ``quick`` lists (a file with none runs nothing). Choose ``default`` so that the family
keeps its comparison (kernel, reference, peers) at the size the README quotes, in a few minutes on 2
cores; ``quick`` so that its suite's ``sparkct bench --quick`` ends well under a minute on 2 cores while
every ratio keeps both sides of its pair. ``benchmarks/conftest.py`` reads the same tables, through
`discover`.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass

from sparkct.errors import UserError

__all__ = ["Pair", "Bench", "read", "discover", "suites", "files"]

_KEYS = {"suite", "pairs", "default", "quick"}
_PAIR_KEYS = {"case", "base", "label", "memory"}


@dataclass(frozen=True)
class Pair:
    """A ratio of a benchmark family: its cases matching `case` against the baseline matching `base`."""

    case: dict
    base: dict
    label: str  # -> speedup_vs_<label>, mem_vs_<label>
    memory: bool = False  # also mem_vs_<label>


@dataclass(frozen=True)
class Bench:
    """One benchmarks/bench_<family>.py and its BENCH table."""

    family: str  # the file's stem, e.g. "bench_info_nce"
    file: str  # its name, e.g. "bench_info_nce.py"
    suite: str
    pairs: tuple[Pair, ...] = ()
    default: tuple[tuple[str, str], ...] = ()
    quick: tuple[tuple[str, str], ...] = ()


def _table(path: str):
    """The literal value of the module-level `BENCH = ...` of the file at `path` (None if it has none)."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    try:
        tree = ast.parse(src, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path}: not valid Python (line {e.lineno}: {e.msg})") from None
    found, table = None, None
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "BENCH" for t in targets):
            if found is not None:
                raise UserError(f"{path}: BENCH is assigned twice (lines {found.lineno} and {node.lineno})")
            found = node
            try:
                table = ast.literal_eval(value)
            except ValueError:
                raise UserError(
                    f"{path}:{node.lineno}: BENCH must be written in literals (dicts, lists, "
                    f"tuples, strings, numbers, True/False/None): it is read without importing "
                    f"the file"
                ) from None
    return table


def _cases(path: str, key: str, v) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, (list, tuple)) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 and all(isinstance(s, str) for s in e) for e in v
    ):
        raise UserError(f"{path}: BENCH[{key!r}] must be a list of (test function, parameter-id pattern) string pairs")
    return tuple((fn, pat) for fn, pat in v)


def _pair(path: str, i: int, p) -> Pair:
    where = f"{path}: BENCH['pairs'][{i}]"
    if not isinstance(p, dict) or not {"case", "base", "label"} <= set(p) or set(p) - _PAIR_KEYS:
        raise UserError(f"{where} must be a dict with 'case', 'base' and 'label' (and optionally 'memory')")
    if not isinstance(p["case"], dict) or not isinstance(p["base"], dict) or not p["base"]:
        raise UserError(f"{where}: 'case' and 'base' must be dicts of pytest parameters (and 'test'); 'base' not empty")
    if not isinstance(p["label"], str) or not p["label"]:
        raise UserError(f"{where}: 'label' must be a non-empty string")
    if not isinstance(p.get("memory", False), bool):
        raise UserError(f"{where}: 'memory' must be True or False")
    return Pair(dict(p["case"]), dict(p["base"]), p["label"], p.get("memory", False))


def read(path: str) -> Bench | None:
    """The declaration of one benchmark file (None if it has no BENCH table); a UserError naming the
    file for a malformed one."""
    table = _table(path)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise UserError(f"{path}: BENCH must be a dict")
    if set(table) - _KEYS:
        raise UserError(
            f"{path}: BENCH has unknown keys {sorted(set(table) - _KEYS)} (known: {', '.join(sorted(_KEYS))})"
        )
    suite = table.get("suite")
    if not isinstance(suite, str) or not suite or suite == "all" or "/" in suite:
        raise UserError(f"{path}: BENCH['suite'] must be a non-empty name (not 'all', no '/')")
    pairs = table.get("pairs", [])
    if not isinstance(pairs, (list, tuple)):
        raise UserError(f"{path}: BENCH['pairs'] must be a list")
    name = os.path.basename(path)
    return Bench(
        family=os.path.splitext(name)[0],
        file=name,
        suite=suite,
        pairs=tuple(_pair(path, i, p) for i, p in enumerate(pairs)),
        default=_cases(path, "default", table.get("default", [])),
        quick=_cases(path, "quick", table.get("quick", [])),
    )


def discover(folder: str) -> dict[str, Bench]:
    """family -> declaration of every bench_*.py in `folder`, in file-name order. A file without a BENCH
    table, or with a malformed one, is a UserError naming it."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("bench_") and name.endswith(".py")):
            continue
        path = os.path.join(folder, name)
        b = read(path)
        if b is None:
            raise UserError(
                f"{path}: no BENCH table: every benchmarks/bench_*.py declares its suite, ratio "
                f"pairs and subsets (see sparkct/perf/registry.py)"
            )
        out[b.family] = b
    return out


def suites(benches: dict[str, Bench]) -> list[str]:
    """The suites the declarations name, sorted."""
    return sorted({b.suite for b in benches.values()})


def files(benches: dict[str, Bench], suites: list[str]) -> list[str]:
    """The file names of `suites`, suite by suite in the order given, in file-name order within one."""
    return [b.file for s in suites for b in benches.values() if b.suite == s]
