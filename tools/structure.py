"""The package's shape, measured from the notebooks and the exported modules: import order, function lengths, definitions per
exported cell and examples per exported cell. `python tools/structure.py` prints the tables; tests/test_structure.py asserts on them."""
import ast, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, PKG = ROOT/'nbs', ROOT/'clip_har'

def notebooks() -> list[Path]:
    "The numbered notebooks, in notebook (= import) order."
    return sorted(p for p in NBS.glob('[0-9]*.ipynb'))

def default_exp(nb:Path) -> str|None:
    "The module a notebook exports to (`#| default_exp name`)."
    for c in json.loads(nb.read_text())['cells']:
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c['source']), re.M)
        if m: return m.group(1)

def module_order() -> dict[str, int]:
    "Each module's place in notebook order."
    return {m: i for i, m in enumerate(default_exp(nb) for nb in notebooks()) if m}

def clip_har_imports(path:Path) -> list[tuple[int, str]]:
    "Every import of a clip_har module in a file, at module level or inside a function: (line, module)."
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: base = node.module
            elif (node.module or '').startswith('clip_har.'): base = node.module.split('.', 1)[1]
            elif node.module == 'clip_har': base = None; out += [(node.lineno, a.name) for a in node.names]
            else: continue
            if base: out.append((node.lineno, base.split('.')[0]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split('.')[1]) for a in node.names if a.name.startswith('clip_har.')]
    return out

def backward_imports() -> list[str]:
    "Imports of a clip_har module that comes later in notebook order than the importing one (or is itself)."
    order, bad = module_order(), []
    for mod, i in order.items():
        for line, dep in clip_har_imports(PKG/f'{mod}.py'):
            if dep in order and order[dep] >= i: bad.append(f'clip_har/{mod}.py:{line} imports {dep} (notebook {order[dep]:02d} >= {i:02d})')
    return bad

def function_lengths() -> list[tuple[int, str]]:
    "Every function and method in the package with its length in lines, longest first."
    out = []
    for p in sorted(PKG.glob('*.py')):
        if p.name.startswith('_'): continue
        tree = ast.parse(p.read_text())
        def walk(node, prefix):
            for ch in ast.iter_child_nodes(node):
                if isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.append((ch.end_lineno - ch.lineno + 1, f'{p.stem}.{prefix}{ch.name}'))
                    walk(ch, f'{prefix}{ch.name}.')
                elif isinstance(ch, ast.ClassDef): walk(ch, f'{prefix}{ch.name}.')
        walk(tree, '')
    return sorted(out, reverse=True)

def _defs(src:str) -> list[ast.AST]:
    try: tree = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('#|', '%', '!'))))
    except SyntaxError: return []
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]

def _is_export(src:str) -> bool: return bool(re.search(r'^#\|\s*export', src, re.M))
def _imports_only(src:str) -> bool:
    "A cell of imports only (a module's import cell has no example of its own)."
    try: tree = ast.parse('\n'.join(l for l in src.splitlines() if not l.lstrip().startswith('#|')))
    except SyntaxError: return False
    return all(isinstance(n, (ast.Import, ast.ImportFrom, ast.Try)) for n in tree.body)
def _is_example(src:str) -> bool:
    "A code cell that runs something: not an export, not only imports, not a hidden/eval:false cell."
    if _is_export(src) or re.search(r'^#\|\s*(eval:\s*false|hide)', src, re.M): return False
    body = [l for l in src.splitlines() if l.strip() and not l.lstrip().startswith(('#', 'from ', 'import '))]
    return bool(body)

def cell_stats(nb:Path) -> dict:
    "Exported cells, definitions per exported cell, cells with several long definitions, and exported cells followed by an example."
    cells = [c for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'code']
    srcs = [''.join(c['source']) for c in cells]
    exports = [i for i, s in enumerate(srcs) if _is_export(s) and not _imports_only(s)]
    defs = [len(_defs(srcs[i])) for i in exports]
    crowded = [i for i in exports if sum((d.end_lineno - d.lineno + 1) > 5 for d in _defs(srcs[i])) > 1]
    def followed(i):
        for s in srcs[i+1:]:
            if _is_example(s): return True
            if _is_export(s): return False
        return False
    lines = [len(srcs[i].splitlines()) for i in exports]
    return dict(notebook=nb.stem, export_cells=len(exports), definitions=sum(defs), crowded=len(crowded),
                with_example=sum(followed(i) for i in exports), median_lines=sorted(lines)[len(lines)//2] if lines else 0,
                crowded_cells=[srcs[i].splitlines()[1][:60] if len(srcs[i].splitlines()) > 1 else '' for i in crowded])

def report(top:int=12):
    fl = function_lengths()
    print(f'## Longest functions (of {len(fl)}; median {fl[len(fl)//2][0]} lines)\n\n| lines | function |\n|---:|---|')
    for n, name in fl[:top]: print(f'| {n} | `{name}` |')
    print('\n## Exported cells per notebook\n\n| notebook | export cells | definitions | cells with 2+ definitions over 5 lines | followed by an example | median lines |\n|---|---:|---:|---:|---:|---:|')
    for nb in notebooks():
        s = cell_stats(nb)
        print(f"| {s['notebook']} | {s['export_cells']} | {s['definitions']} | {s['crowded']} | {s['with_example']} | {s['median_lines']} |")
    bad = backward_imports()
    print(f'\n## Imports of later modules: {len(bad)}'); [print('-', b) for b in bad]

if __name__ == '__main__': report(int(sys.argv[1]) if len(sys.argv) > 1 else 12)
