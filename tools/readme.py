"""Render `nbs/index.ipynb` as `README.md` (what `nbdev_readme` does with Quarto, which cannot be installed here)."""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def cell_src(c): return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

def render(nb_path=root/'nbs'/'index.ipynb') -> str:
    "The README markdown: markdown cells as they are, code cells as python blocks; `#| hide` cells left out."
    nb = json.loads(Path(nb_path).read_text())
    parts = []
    for c in nb['cells']:
        src = cell_src(c)
        lines = src.splitlines()
        directives = [l for l in lines if l.startswith('#|')]
        if any(d.replace(' ', '') in ('#|hide', '#|include:false') for d in directives): continue
        body = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
        if not body: continue
        parts.append(body if c['cell_type'] == 'markdown' else f'```python\n{body}\n```')
    text = '\n\n'.join(parts) + '\n'
    text = re.sub(r'\]\((images/[^)]+|\w+\.ipynb)\)', r'](nbs/\1)', text)  # links relative to nbs/, as the README sits at the root
    return text.replace('> Human action', 'Human action', 1)

if __name__ == '__main__':
    (root/'README.md').write_text(render())
    print('README.md written from nbs/index.ipynb')
