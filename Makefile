# clip_har: `make run` (the main job) and `make test` (every check) do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests and docs never touch the network.
OFFLINE := CLIP_HAR_BENCH=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline DO_NOT_TRACK=1
## Bytecode is compiled once, by the first process that imports a module, and saved beside it for the rest: this machine
## sets PYTHONDONTWRITEBYTECODE=1, under which each of `make test`'s ~150 processes compiled all it imported again
## (`import clip_har.model`: 4.6 s uncompiled, 1.9 s compiled). Only what is imported: a run imports 10,700 of the
## environment's 24,700 files, and byte-compiling them all at install (compileall) took 28-42 s on both cores.
unexport PYTHONDONTWRITEBYTECODE
DEMO_SOURCE := $(shell [ -f ../shared/data/har-mini/labels.csv ] && echo ../shared/data/har-mini || echo nbs/fixtures/har-tiny)

.PHONY: install lock run demo test check nbtest pytest docs export bench-data bench-model bench-train bench-infer bench-serve bench-pipeline serve clean

## torch 2.14.1 brings its CUDA libraries: the environment takes about 8 GB, so a first install checks for 9 GB free.
NEED_GB := 9
$(STAMP): settings.ini setup.py requirements.lock
	@ls -d $(VENV)/lib/python*/site-packages/torch >/dev/null 2>&1 || { free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  [ "$$free" -ge $(NEED_GB) ] || { echo "make install: $$free GB free on this disk; the environment (torch 2.14.1 with its CUDA libraries) needs about $(NEED_GB) GB" >&2; exit 1; }; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# The exact versions of requirements.lock, without resolving them again (pip's resolver: 13-18 s of a fresh install here);
	@# then every requirement of clip_har and its extras, and theirs in turn, is checked against what was installed.
	$(BIN)/python -m pip install -q --no-compile --no-deps -r requirements.lock
	$(BIN)/python -m pip install -q --no-compile --no-deps -e .
	$(BIN)/python tools/lock.py check
	@# What nearly every process imports (clip_har's modules, papermill, the kernel: 3,900 files) is compiled here, once,
	@# not by each of the processes that `make test` starts side by side, all at the same moment; in two processes side by side:
	@# clip_har's modules (torch, fastai, open_clip, mlflow: 12 s), and the notebook machinery (3.5 s) with the kernel's registration.
	{ $(BIN)/python -W ignore -c "import papermill, ipykernel.kernelapp" && $(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null; } & kernel=$$!; \
	$(BIN)/python -W ignore -c "from clip_har.core import preload_package; preload_package()" \
	  && wait $$kernel
	@touch $(STAMP)

install: $(STAMP)

## After changing settings.ini's requirements: pip resolves them again, installing nothing, into requirements.lock.
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip packaging
	$(BIN)/python tools/lock.py write

## The main job, with params.yaml as it is (the HAR dataset from the Hub, ViT-B-16/openai): `clip-har pipeline` runs
## prepare, zeroshot, train, evaluate (+ model card), export, benchmark, each its notebook under papermill, through DVC.
run: install
	$(BIN)/clip-har pipeline

## The same pipeline offline in demo/ (its params.yaml: tiny random CLIP on har-mini or the committed fixtures): a smoke run.
demo: install
	$(OFFLINE) $(BIN)/clip-har pipeline --demo
	cd demo && $(OFFLINE) $(abspath $(BIN))/clip-har runs

## Every check: install and check first, then nbtest, docs and pytest side by side. They are independent, and together they
## keep both cores busy where one after another left them idle a fifth of nbtest and a tenth of pytest. Each phase is timed
## with the share of the CPUs busy while it ran, disk in use sampled; nbtest's and docs' output goes to outputs/test-run/
## and is printed when pytest ends. At the end a table of the phases, the peak disk and the 20 slowest tests
## (tools/summary.py, from outputs/test-run/), whose last line is pytest's count. Every temporary file of the run
## (pytest's, the notebooks', wandb's, torchrun's, chromium's profiles) goes to one folder, removed at the end, so the
## run leaves nothing in /tmp; compiled kernels are kept in .cache/torchinductor, shared by the run's processes and the next run.
TEST_RUN := outputs/test-run
test:
	@mkdir -p $(TEST_RUN); : > $(TEST_RUN)/phases.tsv; rm -f $(TEST_RUN)/pytest.xml $(TEST_RUN)/*.log; ls -A /tmp > $(TEST_RUN)/tmp-before.txt; rc=0; \
	run_tmp=$$(mktemp -d /tmp/clip-har-test-XXXXXX); chmod 1777 $$run_tmp; \
	export TMPDIR=$$run_tmp TORCHINDUCTOR_CACHE_DIR=$${TORCHINDUCTOR_CACHE_DIR:-$(CURDIR)/.cache/torchinductor}; \
	disk_kb() { df -Pk . /tmp | awk 'NR > 1 && !seen[$$1]++ {s += $$3} END {print s}'; }; \
	cpu_ticks() { awk '/^cpu / {print $$2 + $$3 + $$4 + $$7 + $$8, $$2 + $$3 + $$4 + $$5 + $$6 + $$7 + $$8}' /proc/stat 2>/dev/null || echo 0 0; }; \
	start=$$(date +%s%N); \
	phase() { t0=$$(date +%s%N); c0=$$(cpu_ticks); \
	  if [ -n "$$2" ]; then $(MAKE) --no-print-directory $$1 > $$2 2>&1; else $(MAKE) --no-print-directory $$1; fi; r=$$?; c1=$$(cpu_ticks); \
	  printf '%s\t%s\t%s\t%s\t%s\n' $$1 $$(( ($$(date +%s%N) - t0) / 1000000 )) $$r "$$(echo $$c0 $$c1 | awk '{print $$3 - $$1 "\t" $$4 - $$2}')" \
	    $$(( (t0 - start) / 1000000 )) >> $(TEST_RUN)/phases.tsv; return $$r; }; \
	( while :; do disk_kb; sleep 2; done ) > $(TEST_RUN)/disk-kb.txt & sampler=$$!; \
	phase install && disk_kb > $(TEST_RUN)/disk-base-kb.txt && phase check || rc=$$?; \
	if [ $$rc -eq 0 ]; then \
	  phase nbtest $(TEST_RUN)/nbtest.log & nbtest=$$!; phase docs $(TEST_RUN)/docs.log & docs=$$!; \
	  phase pytest || rc=$$?; wait $$nbtest || rc=$$?; wait $$docs || rc=$$?; \
	  for p in nbtest docs; do printf '\n## make %s (side by side with pytest): its output\n\n' $$p; cat $(TEST_RUN)/$$p.log; done; \
	fi; \
	kill $$sampler; rm -rf $$run_tmp; ls -A /tmp > $(TEST_RUN)/tmp-after.txt; \
	$(PYTHON) tools/summary.py $(TEST_RUN); exit $$rc

check: install
	$(BIN)/python tools/check_sync.py

## nbtest and pytest run two test processes each, side by side: each process gets half the cores, at least one, for torch and
## ONNX Runtime (OMP_NUM_THREADS). On 2 cores, two ViT-B-16 passes of 2 threads each ran 3.1 + 3.1 images/s; of 1 thread
## each, 4.5 + 4.5. Inductor compiles in the test's own process (TORCHINDUCTOR_COMPILE_THREADS=1): for the tests' small
## graphs a pool of compile workers costs more than it saves (03_model's compiled runner: 21.5 s with the pool, 17.2 s without).
## nbtest is nbdev_test with clip_har's modules imported (and frozen) before its two workers fork: tools/nbtest.py.
TEST_THREADS := $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n / 2 > 1 ? n / 2 : 1 )))
nbtest: install
	$(OFFLINE) OMP_NUM_THREADS=$(TEST_THREADS) TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python tools/nbtest.py --n_workers 2 --timing

docs: install
	$(OFFLINE) $(BIN)/python tools/docs.py

## Two workers, one test file each (a file's tests share its fixtures: a server, a demo run), the longest first (conftest.py);
## its JUnit XML feeds `make test`'s summary.
pytest: install
	$(OFFLINE) OMP_NUM_THREADS=$(TEST_THREADS) TORCHINDUCTOR_COMPILE_THREADS=1 $(BIN)/python -m pytest tests -q -p no:cacheprovider --junitxml=$(TEST_RUN)/pytest.xml -n 2 --dist loadfile --no-loadscope-reorder

## After editing notebooks: export the package, clean the notebooks, render the README.
export: install
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean && $(BIN)/python tools/readme.py

bench-data: install
	$(OFFLINE) CLIP_HAR_BENCH=1 $(BIN)/python -c "from clip_har.data import benchmark_loaders; benchmark_loaders('$(DEMO_SOURCE)')"

bench-train: install
	$(OFFLINE) CLIP_HAR_BENCH=1 $(BIN)/python -c "from clip_har.train import benchmark_training as b; b('clip-har-tiny-test', bs=32, n_batches=16); b('ViT-B-32', bs=8, n_batches=4)"

bench-model: install
	$(OFFLINE) CLIP_HAR_BENCH=1 $(BIN)/python -c "from clip_har.model import benchmark_classifier_build as b; b('ViT-B-32'); b('ViT-B-32', 'imagenet')"

## Every inference backend side by side (ViT-B/32 shapes, random weights): outputs/benchmark/benchmark.md
bench-infer: install
	$(OFFLINE) CLIP_HAR_BENCH=1 $(BIN)/clip-har benchmark --set device=cpu --out outputs/benchmark

## The main job's stages with ViT-B-16 on a rehearsal cache (420 har-mini photos, split 210 / 105 / 105), as before / fp32 /
## bf16 side by side (bf16 only on CPUs with native bf16): seconds, images/s and peak memory per stage, projected to the
## 12,600 Hub images: outputs/benchmark/pipeline/pipeline.md (about 45 minutes for before + fp32 on 2 cores)
bench-pipeline: install
	$(OFFLINE) CLIP_HAR_BENCH=1 $(BIN)/python -c "from clip_har.pipeline import benchmark_pipeline; benchmark_pipeline()"

## The HTTP service: dynamic batching vs batch-1 at concurrency 1, 8, 32; served vs raw Predictor throughput
## (tiny model and ViT-B/32 shapes, random weights): outputs/benchmark/serving-*/serving.md
bench-serve: install
	$(OFFLINE) CLIP_HAR_BENCH=1 $(BIN)/clip-har benchmark --serving --model-name clip-har-tiny-test --requests 2000
	$(OFFLINE) CLIP_HAR_BENCH=1 $(BIN)/clip-har benchmark --serving --model-name ViT-B-32 --requests 300

## The prediction API on 127.0.0.1:8000 (serve.* in params.yaml), serving the trained model or its ONNX export
serve: install
	$(BIN)/clip-har serve

clean:
	rm -rf _proc _docs .pytest_cache
