#!/usr/bin/env python3
"""Import cycles between the modules of every crate of the workspace.

Rust forbids cycles between crates but not between the modules of one
crate; this finds them. For each crate (the root package and every
`[workspace] members` entry with a `src/lib.rs` or `src/main.rs`) it builds
the module tree from `mod` declarations (file modules, `#[path]`, inline
`mod x { .. }`), reads every path that names a module of the crate (`use`
trees and paths in code starting with `crate::`, `super::`, `self::`, a
child module or a name a `use` bound), resolves it through re-exports to
the module that defines the item, and reports the strongly connected
components of the resulting graph.

* A `mod` declaration is containment, not an import: no edge.
* A `pub use child::X` facade is an edge parent -> child, so a child that
  names an item its parent *defines* closes a cycle (one that names an item
  its parent merely re-exports resolves to the defining module).
* Test modules (`mod tests`) are modules like any other: their imports are
  edges, but nothing imports them, so they never close a cycle.
* Paths to other crates are left out: Cargo already forbids crate cycles.

Usage: tools/check_module_cycles.py [--edges] [--crate NAME]... [ROOT]
  --edges   also print every module with the modules it imports
  --crate   only these crates (`pipeline_engine`, `medreason_pipeline (bin)`
            may be given as `medreason_pipeline`)
Exit status 1 when a cycle exists, 0 otherwise. Only the standard library.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------- lexer


@dataclass
class Tok:
    kind: str  # "id", "str", "p" (punctuation; "::" is one token)
    text: str
    line: int


IDENT_START = re.compile(r"[A-Za-z_]")
IDENT = re.compile(r"[A-Za-z0-9_]*")


def lex(src: str) -> list[Tok]:
    """Tokens of Rust source without comments; string literals keep their text."""
    toks: list[Tok] = []
    i, n, line = 0, len(src), 1
    while i < n:
        c = src[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if src.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif src.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    line += src[i] == "\n"
                    i += 1
        elif (m := re.compile(r'b?r(#*)"').match(src, i)) is not None:
            # Raw string: ends at `"` followed by the same number of `#`.
            end = '"' + m.group(1)
            j = src.find(end, m.end())
            j = n if j < 0 else j
            toks.append(Tok("str", src[m.end() : j], line))
            line += src.count("\n", i, j)
            i = j + len(end)
        elif c == '"' or src.startswith('b"', i):
            j = i + (2 if c == "b" else 1)
            start = j
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            toks.append(Tok("str", src[start:j], line))
            line += src.count("\n", i, j)
            i = j + 1
        elif c == "'" or src.startswith("b'", i):
            j = i + (2 if c == "b" else 1)
            if j < n and src[j] == "\\":  # escaped char literal
                k = src.find("'", j + 2)
                i = n if k < 0 else k + 1
            elif j + 1 < n and src[j + 1] == "'":  # plain char literal
                i = j + 2
            else:  # a lifetime or label
                i = j
                m = IDENT.match(src, i)
                i = m.end() if m else i
        elif src.startswith("r#", i) and i + 2 < n and IDENT_START.match(src[i + 2]):
            m = IDENT.match(src, i + 2)
            toks.append(Tok("id", src[i + 2 : m.end()], line))
            i = m.end()
        elif IDENT_START.match(c):
            m = IDENT.match(src, i)
            toks.append(Tok("id", src[i : m.end()], line))
            i = m.end()
        elif c.isdigit():
            m = re.compile(r"[0-9][0-9A-Za-z_]*(\.[0-9][0-9A-Za-z_]*)?").match(src, i)
            i = m.end()
        elif src.startswith("::", i):
            toks.append(Tok("p", "::", line))
            i += 2
        else:
            toks.append(Tok("p", c, line))
            i += 1
    return toks


# ---------------------------------------------------------------- modules


@dataclass
class Module:
    name: str  # "recipe::build"; "" for the crate root
    file: Path
    children: dict[str, "Module"] = field(default_factory=dict)
    parent: "Module | None" = None
    # Name -> absolute-or-relative path segments it was bound to by `use`.
    bindings: dict[str, list[str]] = field(default_factory=dict)
    # Every path this module names: (segments, line, from a `use`).
    paths: list[tuple[list[str], int]] = field(default_factory=list)
    globs: list[list[str]] = field(default_factory=list)


def matching_brace(toks: list[Tok], open_ix: int) -> int:
    depth = 0
    for k in range(open_ix, len(toks)):
        if toks[k].text == "{" and toks[k].kind == "p":
            depth += 1
        elif toks[k].text == "}" and toks[k].kind == "p":
            depth -= 1
            if depth == 0:
                return k
    return len(toks) - 1


def path_attr(toks: list[Tok], mod_ix: int) -> str | None:
    """The `#[path = "..."]` attribute written before the `mod` at `mod_ix`."""
    k = mod_ix - 1
    # Skip a visibility: `pub`, `pub(crate)`, `pub(super)`, `pub(in x)`.
    if k >= 0 and toks[k].text == ")":
        while k >= 0 and toks[k].text != "(":
            k -= 1
        k -= 1
    if k >= 0 and toks[k].text == "pub":
        k -= 1
    # Walk back over attributes `#[...]`.
    while k >= 0 and toks[k].text == "]":
        end = k
        while k >= 0 and toks[k].text != "[":
            k -= 1
        attr = toks[k + 1 : end]
        if len(attr) == 3 and attr[0].text == "path" and attr[1].text == "=" and attr[2].kind == "str":
            return attr[2].text
        k -= 2  # `[` and `#`
    return None


def parse_use_tree(toks: list[Tok], k: int, prefix: list[str], out: list[tuple[list[str], str | None, bool]]) -> int:
    """Parse a use tree at `k`; append (path, bound name, glob). Returns the next index."""
    segs = list(prefix)
    while k < len(toks):
        t = toks[k]
        if t.kind == "id":
            segs.append(t.text)
            k += 1
            if k < len(toks) and toks[k].text == "::":
                k += 1
                continue
            name = segs[-1]
            if k + 1 < len(toks) and toks[k].text == "as":
                name = toks[k + 1].text
                k += 2
            if segs[-1] == "self":
                segs.pop()
                name = segs[-1] if name == "self" else name
            out.append((segs, None if name == "_" else name, False))
            return k
        if t.text == "*":
            out.append((segs, None, True))
            return k + 1
        if t.text == "{":
            k += 1
            while k < len(toks) and toks[k].text != "}":
                if toks[k].text == ",":
                    k += 1
                    continue
                k = parse_use_tree(toks, k, segs, out)
            return k + 1
        if t.text == "::":  # leading `::crate_name`
            k += 1
            continue
        return k + 1
    return k


def scan(toks: list[Tok], mod: Module, crate_dir: Path, file_dir: Path, load) -> None:
    """Collect `mod`s, `use`s and paths of the tokens of one module body."""
    k = 0
    while k < len(toks):
        t = toks[k]
        prev = toks[k - 1].text if k else ""
        if t.kind == "id" and t.text == "mod" and k + 1 < len(toks) and toks[k + 1].kind == "id":
            name = toks[k + 1].text
            after = toks[k + 2].text if k + 2 < len(toks) else ";"
            if after == ";":
                load(mod, name, path_attr(toks, k), file_dir)
                k += 3
                continue
            if after == "{":
                end = matching_brace(toks, k + 2)
                child = Module(f"{mod.name}::{name}".lstrip(":"), mod.file, parent=mod)
                mod.children[name] = child
                scan(toks[k + 3 : end], child, crate_dir, file_dir / name, load)
                k = end + 1
                continue
        if t.kind == "id" and t.text == "use" and prev != "::":
            out: list[tuple[list[str], str | None, bool]] = []
            end = k + 1
            while end < len(toks) and toks[end].text != ";":
                end += 1
            parse_use_tree(toks[: end + 1], k + 1, [], out)
            for segs, name, glob in out:
                if not segs:
                    continue
                mod.paths.append((segs, t.line))
                if glob:
                    mod.globs.append(segs)
                elif name:
                    mod.bindings[name] = segs
            k = end + 1
            continue
        if t.kind == "id" and prev != "::" and k + 1 < len(toks) and toks[k + 1].text == "::":
            segs = [t.text]
            j = k + 1
            while j + 1 < len(toks) and toks[j].text == "::" and toks[j + 1].kind == "id":
                segs.append(toks[j + 1].text)
                j += 2
            mod.paths.append((segs, t.line))
            k = j
            continue
        k += 1


class Crate:
    def __init__(self, name: str, root_file: Path):
        self.name = name
        self.root = Module("", root_file)
        self.problems: list[str] = []
        self._load_file(self.root, root_file)

    def _load_file(self, mod: Module, file: Path) -> None:
        toks = lex(file.read_text(encoding="utf-8"))
        is_dir_owner = file.name in ("lib.rs", "main.rs", "mod.rs")
        child_dir = file.parent if is_dir_owner else file.parent / file.stem
        scan(toks, mod, file.parent, child_dir, lambda m, n, p, d: self._load_child(m, n, p, d, file))

    def _load_child(self, parent: Module, name: str, attr: str | None, child_dir: Path, decl_file: Path) -> None:
        if attr is not None:
            candidates = [decl_file.parent / attr]
        else:
            candidates = [child_dir / f"{name}.rs", child_dir / name / "mod.rs"]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            self.problems.append(f"{decl_file}: `mod {name};` has no file ({', '.join(map(str, candidates))})")
            return
        child = Module(f"{parent.name}::{name}".lstrip(":"), path, parent=parent)
        parent.children[name] = child
        self._load_file(child, path)

    def modules(self) -> list[Module]:
        out, stack = [], [self.root]
        while stack:
            m = stack.pop()
            out.append(m)
            stack.extend(m.children.values())
        return sorted(out, key=lambda m: m.name)

    def resolve(self, mod: Module, segs: list[str], depth: int = 0) -> Module | None:
        """The module defining the item `segs` names from `mod`; None: another crate or a local item."""
        if depth > 16 or not segs:
            return None
        first, rest = segs[0], segs[1:]
        if first == "crate":
            cur = self.root
        elif first == "super":
            cur = mod.parent or mod
            while rest and rest[0] == "super":
                cur, rest = cur.parent or cur, rest[1:]
        elif first == "self":
            cur = mod
        elif first in mod.children:
            cur = mod.children[first]
        elif first in mod.bindings and mod.bindings[first] != segs[:1]:
            return self.resolve(mod, mod.bindings[first] + rest, depth + 1)
        else:
            return None
        while rest and rest[0] in cur.children:
            cur, rest = cur.children[rest[0]], rest[1:]
        if rest and rest[0] in cur.bindings:
            target = self.resolve(cur, cur.bindings[rest[0]] + rest[1:], depth + 1)
            return target
        return cur

    def edges(self) -> dict[str, dict[str, int]]:
        """module -> {imported module: first line naming it}."""
        graph: dict[str, dict[str, int]] = {}
        for m in self.modules():
            deps = graph.setdefault(m.name, {})
            for segs, line in m.paths:
                target = self.resolve(m, segs)
                if target is not None and target is not m:
                    deps.setdefault(target.name, line)
        return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, {}))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            pushed = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, {})))))
                    pushed = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if pushed:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def workspace_crates(root: Path) -> list[tuple[str, Path]]:
    manifest = tomllib.loads((root / "Cargo.toml").read_text(encoding="utf-8"))
    dirs = [root] + [root / m for m in manifest.get("workspace", {}).get("members", [])]
    crates = []
    for d in dirs:
        pkg = tomllib.loads((d / "Cargo.toml").read_text(encoding="utf-8")).get("package", {})
        name = pkg.get("name", d.name).replace("-", "_")
        for entry in ("src/lib.rs", "src/main.rs"):
            if (d / entry).is_file():
                suffix = "" if entry.endswith("lib.rs") else " (bin)"
                crates.append((name + suffix, d / entry))
    return crates


def label(crate: str, module: str) -> str:
    return f"{crate}::{module}" if module else crate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=Path(__file__).resolve().parent.parent, type=Path)
    ap.add_argument("--edges", action="store_true", help="print every module and the modules it imports")
    ap.add_argument("--crate", action="append", default=[], help="only this crate (repeatable)")
    args = ap.parse_args()
    crates = [(n, f) for n, f in workspace_crates(args.root) if not args.crate or n.split(" ")[0] in args.crate]
    if args.crate and not crates:
        print(f"no crate named {', '.join(args.crate)}", file=sys.stderr)
        return 2
    cycles = 0
    for name, root_file in crates:
        crate = Crate(name, root_file)
        for p in crate.problems:
            print(f"warning: {p}", file=sys.stderr)
        graph = crate.edges()
        if args.edges:
            print(f"# {name} ({root_file.relative_to(args.root)})")
            for m in sorted(graph):
                deps = ", ".join(sorted(graph[m])) or "-"
                print(f"  {m or '(root)'} -> {deps}")
        for comp in strongly_connected(graph):
            cycles += 1
            print(f"cycle in {name}: {' <-> '.join(comp)}")
            members = set(comp)
            mods = {m.name: m for m in crate.modules()}
            for m in comp:
                for dep, line in sorted(graph[m].items()):
                    if dep in members:
                        rel = mods[m].file.relative_to(args.root)
                        print(f"    {label(name, m)} -> {label(name, dep)}  ({rel}:{line})")
    if cycles == 0:
        print(f"no module import cycles in {len(crates)} crates")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
