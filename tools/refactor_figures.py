"""Refactor figures: package-level import cycles, imports inside functions, largest modules."""
import ast, os, sys, itertools
from collections import defaultdict
root = sys.argv[1]
plat = os.path.join(root, "platform")
mods = {}
for base in (plat, root):
    sub = "lorafleet" if base == plat else "services"
    for dp, dn, fn in os.walk(os.path.join(base, sub)):
        for f in fn:
            if f.endswith(".py"):
                p = os.path.join(dp, f)
                rel = os.path.relpath(p, base)[:-3].replace(os.sep, ".")
                if rel.endswith(".__init__"): rel = rel[:-9]
                mods[rel] = p
def pkg(m):
    parts = m.split(".")
    if parts[0] == "services": return "services"
    return ".".join(parts[:2])
def resolve(mod, node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = mod.split(".")
        if not mods[mod].endswith("__init__.py"): base = base[:-1]
        base = base[: len(base) - node.level + 1]
        b = ".".join(base + ([node.module] if node.module else []))
    else:
        b = node.module or ""
    out = []
    for a in node.names:
        full = b + "." + a.name
        out.append(full if full in mods else b)
    return out
edges = defaultdict(set)  # pkg -> pkg
inner = 0
inner_by = defaultdict(int)
for m, p in mods.items():
    tree = ast.parse(open(p).read())
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    infunc = set()
    for f in funcs:
        for n in ast.walk(f):
            if isinstance(n, (ast.Import, ast.ImportFrom)): infunc.add(id(n))
    for n in ast.walk(tree):
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            if id(n) in infunc:
                inner += 1; inner_by[m] += 1
            for t in resolve(m, n):
                if t.split(".")[0] in ("lorafleet", "services"):
                    a, b = pkg(m), pkg(t)
                    if a != b and b != "lorafleet": edges[a].add(b)
# cycles: SCCs + 2-cycles
pairs = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if a in edges.get(b, ())})
# tarjan
idx = {}; low = {}; st = []; on = set(); sccs = []; c = [0]
sys.setrecursionlimit(10000)
nodes = set(edges) | {b for v in edges.values() for b in v}
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        s = []
        while True:
            w = st.pop(); on.discard(w); s.append(w)
            if w == v: break
        if len(s) > 1: sccs.append(sorted(s))
for v in sorted(nodes):
    if v not in idx: sc(v)
print("package pairs importing each other (2-cycles):", len(pairs))
for p in pairs: print("  ", " <-> ".join(p))
print("strongly connected groups of packages:", len(sccs))
for s in sccs: print("  ", ", ".join(s))
print("imports inside functions (platform/ + services/):", inner)
sizes = sorted(((sum(1 for _ in open(p)), m) for m, p in mods.items()), reverse=True)[:10]
print("largest modules:")
for n, m in sizes: print(f"   {n:5d} {m}")
# breakdown of imports inside functions: project-internal vs third-party
internal = 0; ext = defaultdict(int)
for m, p in mods.items():
    tree = ast.parse(open(p).read())
    seen = set()
    for f in ast.walk(tree):
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for n in ast.walk(f):
                if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in seen:
                    seen.add(id(n))
                    ts = resolve(m, n)
                    if any(t.split(".")[0] in ("lorafleet", "services") for t in ts): internal += 1
                    else: ext[ts[0].split(".")[0]] += 1
print("  of which import lorafleet/services modules:", internal)
print("  third-party/stdlib:", dict(sorted(ext.items(), key=lambda x: -x[1])))
lib_to_services = sorted(m for m, p in mods.items() if not m.startswith("services") for n in ast.walk(ast.parse(open(p).read())) if isinstance(n,(ast.Import,ast.ImportFrom)) and any(t.startswith("services") for t in resolve(m,n)))
print("library modules importing services:", sorted(set(lib_to_services)))
