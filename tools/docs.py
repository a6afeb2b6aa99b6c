"""Build the docs site offline: nbdev's notebook processors (API docs from `show_doc`), then smalldocs renders
the `_quarto.yml` project. Real Quarto, where installed, renders the same `_proc` folder: `quarto render _proc`."""
import shutil, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def main():
    from nbdev.serve import proc_nbs
    from nbdev.doclinks import _build_modidx
    _build_modidx()
    # One process: every notebook imports clip_har's modules (torch, fastai, open_clip, mlflow), which two worker processes
    # each imported again (26 CPU-s in all; 17 in one). Imported first, with the collector paused, and frozen out of its way
    # (preload_package): IPython runs a full gc.collect as each notebook's shell closes, over every object those imports made
    # (0.4 s a notebook).
    from clip_har.core import preload_package
    preload_package()
    proc = proc_nbs(str(root/'nbs'), n_workers=0, force=True)  # runs each notebook's exports + show_doc cells
    for f in ('_quarto.yml', 'styles.css'): shutil.copy(root/f, proc/f)
    shutil.rmtree(proc/'fixtures', ignore_errors=True)
    quarto = shutil.which('quarto')
    cmd = [quarto, 'render', str(proc)] if quarto else [str(Path(sys.executable).parent/'smalldocs'), 'render', str(proc)]
    subprocess.run(cmd, check=True)
    out = root/'_docs'
    if out.exists(): shutil.rmtree(out)
    shutil.move(str(proc/'_docs'), str(out))
    print(f'docs site: {out}/index.html ({"quarto" if quarto else "smalldocs"})')

if __name__ == '__main__': main()
