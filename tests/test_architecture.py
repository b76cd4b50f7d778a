"""The tree against its map: no import cycle between packages; docs/ARCHITECTURE.md names every module
(as `library/data/config.py`, the path in backticks).

Packages are the sub-packages (library.data, library.flux, library.train, networks) and each top-level module
of library/ (library.errors, library.flow, ...). Every import counts, at the top of a file or inside a
function: a cycle hidden behind a function-level import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> list[Path]:
    return sorted([*REPO.glob("library/**/*.py"), *REPO.glob("networks/**/*.py")])


def _node(module: str) -> str | None:
    """The package a dotted module name belongs to, or None outside library/ and networks/."""
    parts = module.split(".")
    if parts[0] == "networks":
        return "networks"
    if parts[0] != "library" or len(parts) < 2:
        return None
    return f"library.{parts[1]}"


def _exists(node: str) -> bool:
    path = REPO / Path(*node.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in files:
        src = _node(".".join(path.relative_to(REPO).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for t in targets:
                dst = _node(t)
                if dst and src and dst != src and _exists(dst):
                    edges.setdefault(src, set()).add(dst)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycle_between_packages() -> None:
    edges = import_graph(_modules())
    assert "library.train" in edges and "library.data" in edges["library.train"]  # the graph is not empty
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges) or [])


def test_a_cycle_is_found() -> None:  # the negative control
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    edges = import_graph(_modules())
    edges.setdefault("library.flux", set()).add("library.train")  # as if the model imported the trainer
    assert find_cycle(edges) is not None


def test_architecture_md_names_every_module() -> None:
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = [rel for p in _modules() if p.name != "__init__.py"
               and f"`{(rel := p.relative_to(REPO).as_posix())}`" not in text]
    assert not missing, f"docs/ARCHITECTURE.md does not describe: {missing}"


# What each package may import (docs/ARCHITECTURE.md, "Packages and the direction of dependence").
_BASE = {"library.errors", "library.atomic"}
ALLOWED = {
    "library.errors": set(), "library.atomic": {"library.errors"}, "library.flow": set(), "library.schedule": set(),
    "library.flux": _BASE,
    "library.objective": _BASE,
    "library.sampling": _BASE | {"library.flux", "library.flow", "library.objective", "library.data"},
    "library.data": _BASE | {"library.flux", "library.schedule"},
    "networks": _BASE | {"library.flux"},
}


def test_packages_import_only_what_the_map_allows() -> None:
    for src, dsts in import_graph(_modules()).items():
        if src in ALLOWED:  # library.train may import everything above it
            assert dsts <= ALLOWED[src], f"{src} imports {sorted(dsts - ALLOWED[src])}"


def test_one_did_you_mean_helper() -> None:
    from library.errors import closest

    assert closest("num_repeat", ["num_repeats", "batch_size"]) == "num_repeats"
    assert closest("zzz", ["num_repeats"]) is None
    users = [p for p in _modules() if "get_close_matches" in p.read_text(encoding="utf-8")]
    assert [p.relative_to(REPO).as_posix() for p in users] == ["library/errors.py"]


def test_flux_geometry_is_defined_once() -> None:
    names = {"LATENT_CHANNELS", "AE_DOWNSAMPLE", "PATCH", "PIXEL_MULTIPLE", "MLP_RATIO", "LATENT_DOWNSCALE",
             "FLUX_MULTIPLE"}
    homes = {}
    for path in _modules():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):  # a literal, not an alias
                for t in node.targets:
                    if isinstance(t, ast.Name) and t.id in names:
                        homes.setdefault(t.id, []).append(path.relative_to(REPO).as_posix())
    assert homes and all(v == ["library/flux/geometry.py"] for v in homes.values()), homes


def test_one_bfl_diffusers_key_table() -> None:
    """The diffusers module names of FLUX are written down once (library/flux/convert.py)."""
    for name in ("attn.add_q_proj", "ff_context.net.0.proj", "time_text_embed.guidance_embedder.linear_1",
                 "norm1_context.linear"):
        homes = [p.relative_to(REPO).as_posix() for p in _modules() if f'"{name}"' in p.read_text(encoding="utf-8")]
        assert homes == ["library/flux/convert.py"], (name, homes)


def test_no_private_names_imported_across_modules() -> None:
    found = []
    for path in [*_modules(), *REPO.glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("library", "networks")):
                found += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not found, found


# Function-level imports kept on purpose: optional dependencies, imported where they are used.
OPTIONAL = {"xformers", "bitsandbytes", "prodigyopt", "wandb", "transformers.optimization"}


def test_imports_are_at_the_top_except_optional_dependencies() -> None:
    inner = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if not any(n.split(".")[0] in OPTIONAL or n in OPTIONAL for n in names):
                    inner.append(f"{path.relative_to(REPO).as_posix()}:{node.lineno} {names}")
    assert inner == []
