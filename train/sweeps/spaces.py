"""Named search spaces (``sweeps/search/<name>.yaml``) for ``glue-train sweep --search FILE``.

A file holds::

    name: bert
    source: Devlin et al. 2019, Appendix A.3 ...   # where the grid comes from (required)
    grid:                                          # axes: the runs cover their cross product
      train.lr: [2e-5, 3e-5, 5e-5]
      train.epochs: [2, 3, 4]
    overrides:                                     # fixed settings of every run (optional)
      - train.weight_decay=0.1                     # a list of key=value, or a mapping key: value

Values are taken as written (the YAML text, not its parsed number), so ``--search FILE`` is exactly the
``--grid train.lr=2e-5,3e-5,5e-5 --grid train.epochs=2,3,4`` options plus the fixed overrides: the same runs, folder
tags and config values. Keys are checked like any override when the sweep loads every run's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from train.errors import SearchError

FIELDS = ("name", "source", "grid", "overrides")


@dataclass(frozen=True)
class Search:
    name: str
    source: str
    grid: tuple[str, ...]  # "key=v1,v2" per axis, as --grid takes them
    overrides: tuple[str, ...]  # "key=value", fixed for every run
    path: Path


def _where(path: Path, node: yaml.Node) -> str:
    return f"{path}:{node.start_mark.line + 1}"


def _scalar(path: Path, node: yaml.Node, what: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or node.value == "":
        raise SearchError(f"{_where(path, node)}: {what} must be a single value")
    return node.value


def _values(path: Path, key: str, node: yaml.Node) -> list[str]:
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    values = [_scalar(path, item, f"each value of grid axis '{key}'") for item in items]
    bad = [v for v in values if "," in v or any(c.isspace() for c in v)]
    if bad or not values:
        raise SearchError(
            f"{_where(path, node)}: grid axis '{key}' needs a list of values without commas or spaces, got "
            f"{bad or 'none'}"
        )
    return values


def _mapping(path: Path, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise SearchError(f"{_where(path, node)}: {what} must be a mapping")
    pairs = [(_scalar(path, k, "a key"), v) for k, v in node.value]
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise SearchError(f"{_where(path, node)}: {what} names {dup} twice")
    return pairs


def _overrides(path: Path, node: yaml.Node) -> list[str]:
    if isinstance(node, yaml.MappingNode):
        return [f"{k}={_scalar(path, v, f'override {k}')}" for k, v in _mapping(path, node, "overrides")]
    if not isinstance(node, yaml.SequenceNode):
        raise SearchError(f"{_where(path, node)}: overrides must be a list of key=value (or a mapping)")
    out = []
    for item in node.value:
        text = _scalar(path, item, "an override")
        if "=" not in text or not text.split("=", 1)[0].strip():
            raise SearchError(f"{_where(path, item)}: override '{text}' must look like key.sub=value")
        out.append(text)
    return out


def load_search(path: str | Path) -> Search:
    """Read a search-space file; every problem is a SearchError naming the file and line."""
    path = Path(path)
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SearchError(f"--search {path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SearchError(f"--search {path}: not valid YAML ({e})") from None
    if root is None:
        raise SearchError(f"--search {path}: empty file")
    fields = dict(_mapping(path, root, "a search space"))
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise SearchError(f"{path}: unknown field(s) {unknown}; a search space has {', '.join(FIELDS)}")
    if "grid" not in fields or "source" not in fields:
        raise SearchError(
            f"{path}: a search space needs 'grid' (its axes) and 'source' (where they come from)"
        )
    axes = [f"{k}={','.join(_values(path, k, v))}" for k, v in _mapping(path, fields["grid"], "grid")]
    if not axes:
        raise SearchError(f"{_where(path, fields['grid'])}: the grid has no axes")
    overrides = _overrides(path, fields["overrides"]) if "overrides" in fields else []
    clash = {o.split("=", 1)[0].strip() for o in overrides} & {a.split("=", 1)[0] for a in axes}
    if clash:
        raise SearchError(f"{path}: {sorted(clash)} is both a grid axis and a fixed override")
    name = _scalar(path, fields["name"], "name") if "name" in fields else path.stem
    source = _scalar(path, fields["source"], "source")
    return Search(name, source, tuple(axes), tuple(overrides), path)
