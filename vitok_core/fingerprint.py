"""Code fingerprints: a SHA-256 of the project source a stage runs, recorded in its manifest.

A stage's artifact key is config + inputs + a hand-bumped CODE_VERSION (docs/orchestration.md, "Keys,
skips and reruns"), so a comment or a refactor does not throw away a multi-day run. The price is that a
code change nobody bumped the version for leaves an old artifact marked done. The fingerprint makes that
visible: every manifest records the fingerprint of the code that wrote it, and `vitok status` and the
Prefect artifacts compare it with the code of this checkout. It only flags; it never changes a key.

What is fingerprinted: the stage's job module(s) and every project module (jobs.*, vitok_core.*) they
import, transitively, found by reading the files with `ast` (imports inside functions count; imports
under `if TYPE_CHECKING:` do not), plus the `__init__.py` of every package on the way. A stage does not
follow another stage's job module: a stage imports another one only to plan that stage's output location,
and that code is fingerprinted as the other stage's. Nothing is imported here, so it works wherever the
files are (a checkout, Ray's copy of the working directory, site-packages) and depends only on the paths
relative to the project root and the files' bytes.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

PACKAGES = ("jobs", "vitok_core")  # the project's own code (pipelines/ is orchestration, not a stage's code)
# A stage's entry modules: train_flow's stage also samples from its model (jobs.sample, the samples live in
# its output directory).
STAGE_MODULES = {
    "ingest": ("jobs.ingest",),
    "train_ae": ("jobs.train_ae",),
    "cache_latents": ("jobs.cache_latents",),
    "train_flow": ("jobs.train_flow", "jobs.sample"),
    "evaluate": ("jobs.evaluate",),
}
ROOT = Path(__file__).resolve().parent.parent  # the directory holding jobs/ and vitok_core/
UNKNOWN, CURRENT, STALE = "unknown", "current", "stale"


def _file_of(module: str, root: Path) -> Path | None:
    """The source file of a project module under `root` (a module file, or a package's __init__.py)."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(source: bytes, module: str, is_package: bool) -> list[str]:
    """The dotted names a module's source imports (absolute and relative; for `from X import name`, both X
    and X.name, since `name` may be a submodule). Filtering to project modules is the caller's."""
    found = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            parent = ".".join([*base, *([node.module] if node.module else [])])
        else:
            parent = node.module or ""
        found.append(parent)
        found += [f"{parent}.{alias.name}" for alias in node.names if alias.name != "*"]
    return [name for name in found if name]


def _packages_of(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_files(entries: Iterable[str], root: Path | str = ROOT, stop: Iterable[str] = ()) -> dict[str, Path]:
    """{relative posix path: file} of the entry modules and the project modules they import, transitively;
    modules in `stop` are neither included nor followed (unless they are entries)."""
    root = Path(root)
    entries = list(entries)
    stop = set(stop) - set(entries)
    files: dict[str, Path] = {}
    todo = list(entries)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen or module in stop:
            continue
        seen.add(module)
        path = _file_of(module, root)
        if path is None:
            if module in entries:
                raise FileNotFoundError(f"no source file for module {module!r} under {root}")
            continue  # not a project module, or a name imported from a module (a function, a constant)
        files[path.relative_to(root).as_posix()] = path
        todo += _packages_of(module)
        todo += imported_modules(path.read_bytes(), module, path.name == "__init__.py")
    return files


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(stage_or_module: str, root: Path | str = ROOT) -> dict[str, Any]:
    """{"fingerprint": 16 hex characters, "files": [relative paths, sorted], "hashes": {path: 16 hex}} of a
    stage ("train_ae") or of one entry module ("jobs.train_ae"). The fingerprint is a SHA-256 over the sorted
    (relative path, SHA-256 of the file's bytes) pairs: the same files give the same fingerprint anywhere."""
    entries = STAGE_MODULES.get(stage_or_module, (stage_or_module,))
    others = {m for modules in STAGE_MODULES.values() for m in modules}
    files = module_files(entries, root, stop=others)
    hashes = {rel: _digest(files[rel].read_bytes()) for rel in sorted(files)}
    combined = "".join(f"{rel}\0{digest}\n" for rel, digest in hashes.items())
    return {
        "fingerprint": _digest(combined.encode())[:16],
        "files": list(hashes),
        "hashes": {rel: digest[:16] for rel, digest in hashes.items()},
    }


def manifest_fields(stage: str, root: Path | str = ROOT) -> dict[str, Any]:
    """What a stage's manifest records of its code: `code_fingerprint` and `code_files` ({path: hash})."""
    found = fingerprint(stage, root)
    return {"code_fingerprint": found["fingerprint"], "code_files": found["hashes"]}


def changed_text(changed: list[str], limit: int = 6) -> str:
    """The changed files of a comparison, for one line: the first `limit`, then how many more."""
    if not changed:
        return "files not recorded"
    more = len(changed) - limit
    return ", ".join(changed[:limit]) + (f" and {more} more" if more > 0 else "")


def compare(
    stage: str, manifest: Mapping[str, Any], now: Mapping[str, Any] | None = None, root: Path | str = ROOT
) -> dict[str, Any]:
    """The manifest's code against this checkout's (`now`: the stage's `fingerprint`, computed when not given):
    {"state": "current" | "stale" | "unknown", "recorded", "current", "changed": [paths whose bytes differ, or
    that were added or removed; empty when the manifest has no `code_files`]}. A manifest without a fingerprint
    (written before fingerprints existed) is "unknown", not stale."""
    now = now or fingerprint(stage, root)
    recorded = manifest.get("code_fingerprint")
    if not isinstance(recorded, str) or not recorded:
        return {"state": UNKNOWN, "recorded": None, "current": now["fingerprint"], "changed": []}
    if recorded == now["fingerprint"]:
        return {"state": CURRENT, "recorded": recorded, "current": now["fingerprint"], "changed": []}
    old = manifest.get("code_files")
    old = old if isinstance(old, Mapping) else {}  # without the recorded files, what changed is not known
    changed = sorted(p for p in set(old) | set(now["hashes"]) if old.get(p) != now["hashes"].get(p)) if old else []
    return {"state": STALE, "recorded": recorded, "current": now["fingerprint"], "changed": changed}
