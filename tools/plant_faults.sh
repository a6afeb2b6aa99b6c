#!/usr/bin/env bash
# Issue 28: plant each of three faults in the working tree, run the tests that should catch them (each should FAIL), revert.
# Needs a clean tree (git checkout reverts) and `make install`; about 3 minutes on 2 cores.
cd "$(dirname "$0")/.."
git diff --quiet -- clip_har nbs || { echo "plant_faults: clip_har/ or nbs/ has uncommitted changes, which its reverts would lose: commit or stash them first" >&2; exit 2; }
export CLIP_HAR_BENCH=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TMPDIR=$(mktemp -d)
PY=.venv/bin/python
echo "=== fault 1: QuickGELU off in load_clip"
sed -i 's/force_quick_gelu=bool(quick_gelu))/force_quick_gelu=False)/' clip_har/model.py; git diff --stat clip_har/model.py
$PY -m pytest tests/test_rehearsal.py -q -p no:cacheprovider -k "vit_b16 or preprocessing" 2>&1 | grep -E "passed|failed|Error|assert" | tail -6
git checkout -q clip_har/model.py
echo "=== fault 2: the evaluate stage notebook raises"
$PY - <<'PY'
import json; p='nbs/08_evaluate.ipynb'; nb=json.load(open(p))
c=next(c for c in nb['cells'] if 'stage = evaluate(stage_cfg' in ''.join(c['source']))
c['source'].insert(0, "raise RuntimeError('planted fault')\n"); open(p,'w').write(json.dumps(nb, indent=1))
PY
git diff --stat nbs/08_evaluate.ipynb
$PY -m pytest tests/test_pipeline.py -q -p no:cacheprovider -k "demo_leaves" 2>&1 | grep -E "passed|failed|planted" | tail -4
git checkout -q nbs/08_evaluate.ipynb
echo "=== fault 3: GET /labels answers 500"
sed -i 's/^async def get_labels(request:Request): return label_state(app_state(request))/async def get_labels(request:Request): raise RuntimeError("planted fault")/' clip_har/serve.py; git diff --stat clip_har/serve.py
$PY -m pytest tests/test_serve.py -q -p no:cacheprovider -k "every_endpoint or client_against" 2>&1 | grep -E "passed|failed|500" | tail -6
git checkout -q clip_har/serve.py
git status --short
rm -rf $TMPDIR
