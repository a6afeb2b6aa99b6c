"""`nbdev_test` with clip_har's modules imported once, before it forks its worker processes.

Every notebook imports clip_har's modules (torch, fastai, open_clip, MLflow), and each of nbdev_test's workers imported
them again. Imported here first (`clip_har.core.preload_package`: the collector paused, then what the imports made
frozen), the forked workers start with them loaded, and their collections visit only what the notebooks make
(122.3 -> 117.7 CPU-s for all notebooks here). Arguments are nbdev_test's own: `python tools/nbtest.py --n_workers 2 --timing`."""

if __name__ == '__main__':
    from clip_har.core import preload_package
    preload_package()
    from nbdev.test import nbdev_test
    nbdev_test()  # call_parse: reads sys.argv
