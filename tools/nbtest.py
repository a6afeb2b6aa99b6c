"""`nbdev_test` with clip_har's modules imported once, before it forks its worker processes.

Every notebook imports clip_har's modules (torch, fastai, open_clip, MLflow), and each of nbdev_test's workers imported
them again. Imported here first, under `frozen_imports` (the collector paused, then what the imports made frozen), the
forked workers start with them loaded, and their collections visit only what the notebooks make. Arguments are
nbdev_test's own: `python tools/nbtest.py --n_workers 2 --timing`."""
import importlib, pkgutil

def preload():
    "Import every clip_har module with the collector paused; freeze what they made."
    import warnings, clip_har
    from clip_har.core import frozen_imports
    with frozen_imports(), warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the libraries' import-time deprecation notices, once here rather than in no notebook's output
        for m in pkgutil.iter_modules(clip_har.__path__, 'clip_har.'): importlib.import_module(m.name)

if __name__ == '__main__':
    preload()
    from nbdev.test import nbdev_test
    nbdev_test()  # call_parse: reads sys.argv
