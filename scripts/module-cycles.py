#!/usr/bin/env python3
"""Lists the import cycles between the modules of each crate of the workspace.

A module is a source file (`a/b.rs` or `a/b/mod.rs` is `a::b`). An edge A -> B is any path
in A's code that names B: `use crate::b::...` (brace groups expanded), `crate::b::f()` inline,
or `super::...` resolved from A. Paths into A's own submodules and A's parent are not counted
(a parent declares its children; a child naming its own parent's items is a cycle only when the
parent also names the child, which is the point of this script, so parent edges ARE counted,
but `mod x;` declarations are not). Prints each strongly connected component of more than one
module, per crate, and exits 1 when there is any.

    scripts/module-cycles.py [CRATE_DIR ...]     # default: every crate of the workspace
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["agent", "replication-server", "proto", "converter", "tests"]


def modules(src):
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)[:-3]
            parts = rel.split(os.sep)
            if parts[-1] == "mod":
                parts = parts[:-1]
            if parts in (["lib"], ["main"]) or parts[0] == "bin":
                parts = []
            mods[os.path.join(dirpath, f)] = tuple(parts)
    return mods


def strip(code):
    code = re.sub(r"//[^\n]*", "", code)
    code = re.sub(r"/\*.*?\*/", "", code, flags=re.S)
    code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
    # test modules are not part of the layering
    m = re.search(r"#\[cfg\(test\)\]\s*mod tests", code)
    if m:
        code = code[: m.start()]
    return code


def use_paths(tree):
    """Expands `a::{b, c::{d, e}}` into lists of segments."""
    out = []

    def parse(s, prefix):
        s = s.strip()
        i = 0
        depth = 0
        items, start = [], 0
        for i, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(s[start:i])
                start = i + 1
        items.append(s[start:])
        for it in items:
            it = it.strip()
            if not it:
                continue
            if "{" in it:
                head, rest = it.split("{", 1)
                head = [p for p in head.strip().rstrip(":").split("::") if p]
                parse(rest[: rest.rfind("}")], prefix + head)
            else:
                it = it.split(" as ")[0].strip()
                out.append(prefix + [p for p in it.split("::") if p])

    parse(tree, [])
    return out


def resolve(segs, me, known):
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = (), segs[1:]
    elif segs[0] == "super":
        base, rest = me[:-1], segs[1:]
        while rest and rest[0] == "super":
            base, rest = base[:-1], rest[1:]
    elif segs[0] == "self":
        base, rest = me, segs[1:]
    else:
        return None
    path = base
    best = base if base in known else None
    for s in rest:
        path = path + (s,)
        if path in known:
            best = path
    return best


def edges(src):
    mods = modules(src)
    known = set(mods.values())
    graph = {m: set() for m in known}
    for f, me in mods.items():
        code = strip(open(f, encoding="utf-8").read())
        paths = []
        for m in re.finditer(r"\buse\s+((?:crate|super|self)\b[^;]*);", code):
            paths += use_paths(m.group(1))
        code_wo_use = re.sub(r"\buse\s+[^;]*;", "", code)
        for m in re.finditer(r"\b((?:crate|super)(?:::[A-Za-z_][A-Za-z0-9_]*)+)", code_wo_use):
            paths.append(m.group(1).split("::"))
        for p in paths:
            t = resolve(p, me, known)
            if t is None or t == me or t == ():
                continue
            # a module naming its own descendant is how a parent uses its children
            if t[: len(me)] == me:
                continue
            graph[me].add(t)
    return graph


def sccs(graph):
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(comp)

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [c for c in out if len(c) > 1]


def main():
    crates = sys.argv[1:] or CRATES
    found = 0
    for c in crates:
        src = os.path.join(ROOT, c, "src")
        if not os.path.isdir(src):
            continue
        g = edges(src)
        for comp in sccs(g):
            found += 1
            names = sorted("::".join(m) for m in comp)
            print(f"{c}: cycle of {len(comp)}: " + ", ".join(names))
            for m in sorted(comp):
                inner = sorted("::".join(t) for t in g[m] if t in comp)
                print(f"    {'::'.join(m)} -> {', '.join(inner)}")
    if not found:
        print("no import cycles")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
