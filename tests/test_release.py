"""Shipping a new model safely: the Kubernetes, KServe, Argo Rollouts and Argo CD manifests against their schemas, and the
canary analysis proven on real series (a stable and a canary `clip-har serve`, a real Prometheus scraping both, the
AnalysisTemplate's own queries)."""
import copy, json, time
from pathlib import Path

import httpx, pytest, yaml
from conftest import ROOT, drift_reference, eventually, start, start_prometheus, stop
from clip_har.core import HAR_LABELS, TINY_MODEL, fixtures_dir
from clip_har.inference import random_classifier

K8S = ROOT/'docker'/'k8s'
CRDS = ROOT.parent/'shared'/'reference'/'schemas'/'crds'  # 2.4 MB of JSON Schemas: read from ../shared, not copied into the repo
CRD_SCHEMAS = {('argoproj.io/v1alpha1', 'Rollout'): 'argoproj.io/rollout_v1alpha1.json',
               ('argoproj.io/v1alpha1', 'AnalysisTemplate'): 'argoproj.io/analysistemplate_v1alpha1.json',
               ('argoproj.io/v1alpha1', 'Application'): 'argoproj.io/application_v1alpha1.json',
               ('serving.kserve.io/v1beta1', 'InferenceService'): 'serving.kserve.io/inferenceservice_v1beta1.json'}
PHOTOS = sorted(fixtures_dir().rglob('*.jpg'))

def manifests() -> list[dict]:
    "Every YAML document under docker/k8s/, subfolders included."
    return [d for f in sorted(K8S.rglob('*.yaml')) for d in yaml.safe_load_all(f.read_text()) if d]

def crd_validator(doc: dict):
    "A strict validator for a custom resource's kind, from the stored CRD schemas."
    import jsonschema
    return jsonschema.Draft7Validator(json.loads((CRDS/CRD_SCHEMAS[doc['apiVersion'], doc['kind']]).read_text()))

def misspelled(doc: dict) -> dict:
    "A copy of `doc` with its spec's first field misspelled."
    bad = copy.deepcopy(doc)
    first = next(iter(bad['spec']))
    bad['spec'][first[:-1] + first[-1].upper()] = bad['spec'].pop(first)
    return bad

def test_every_manifest_validates_against_its_schema():
    "Custom resources against the stored CRD schemas (strict), built-in kinds with kubernetes-validate; a misspelled field fails either way."
    import kubernetes_validate
    if not CRDS.is_dir(): pytest.skip(f'the CRD schemas are not here ({CRDS}: ../shared is absent in a bare clone; CI has it)')
    docs = manifests()
    custom = [d for d in docs if (d['apiVersion'], d['kind']) in CRD_SCHEMAS]
    assert {d['kind'] for d in custom} == {'Rollout', 'AnalysisTemplate', 'Application', 'InferenceService'}
    for d in docs:
        if d in custom: assert not [e.message for e in crd_validator(d).iter_errors(d)], d['kind']
        else: kubernetes_validate.validate(d, '1.31.0', strict=True)
    for d in custom:
        errors = [e.message for e in crd_validator(d).iter_errors(misspelled(d))]
        assert any('Additional properties are not allowed' in e for e in errors), (d['kind'], errors)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelled(next(d for d in docs if d['kind'] == 'Deployment')), '1.31.0', strict=True)

def test_the_release_manifests_fit_together():
    "The Rollout runs the Deployment's pods, the HPA scales the Rollout, and the analysis reads the canary's series by its track label."
    docs = {(d['kind'], d['metadata']['name']): d for d in manifests()}
    rollout = docs['Rollout', 'clip-har-api']
    canary = rollout['spec']['strategy']['canary']
    assert rollout['spec']['workloadRef'] == {'apiVersion': 'apps/v1', 'kind': 'Deployment', 'name': 'clip-har-api', 'scaleDown': 'onsuccess'}
    assert ('Service', canary['stableService']) in docs and ('Service', canary['canaryService']) in docs
    assert canary['canaryMetadata']['labels'] == {'track': 'canary'} and canary['stableMetadata']['labels'] == {'track': 'stable'}
    template = docs['AnalysisTemplate', canary['analysis']['templates'][0]['templateName']]
    assert all('track="canary"' in m['provider']['prometheus']['query'] for m in template['spec']['metrics'])
    assert docs['HorizontalPodAutoscaler', 'clip-har-api']['spec']['scaleTargetRef']['kind'] == 'Rollout'
    app = docs['Application', 'clip-har']['spec']
    assert app['source']['path'] == 'docker/k8s' and app['syncPolicy']['automated'] == {'prune': True, 'selfHeal': True}
    isvc = docs['InferenceService', 'clip-har']['spec']['predictor']
    assert 0 < isvc['canaryTrafficPercent'] < 100 and isvc['containers'][0]['readinessProbe']['httpGet']['path'] == '/v2/health/ready'

def query(api: str, q: str) -> list[float]:
    "The values of an instant query through Prometheus' HTTP API (none while it starts)."
    try: body = httpx.get(api, params={'query': q}, timeout=10).json()
    except (httpx.HTTPError, ValueError): return []
    assert body['status'] == 'success', body
    return [float(r['value'][1]) for r in body['data']['result']]

def holds(condition: str, result: list[float]) -> bool:
    "An Argo Rollouts successCondition (`result[0] <= 0.01`: expr syntax Python shares) on a query's result; an empty or NaN result fails, as in Argo."
    if not result or result[0] != result[0]: return False
    return bool(eval(condition, {'__builtins__': {}}, {'result': result}))

def answer_all(url: str, photos: list, concurrency: int = 4) -> list[tuple[str, str]]:
    "Post each photo to /predict/image, `concurrency` at a time (as production traffic comes): (prediction id, top label) of each answer."
    from concurrent.futures import ThreadPoolExecutor
    with httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:
        def one(p):
            r = c.post('/predict/image', files={'file': ('a.jpg', p if isinstance(p, bytes) else p.read_bytes(), 'image/jpeg')}).json()
            return r['prediction_id'], r['predictions'][0]['class_name']
        with ThreadPoolExecutor(concurrency) as pool: return list(pool.map(one, photos))

def feedback(url: str, answers: list, right: bool) -> list[int]:
    "Users' word on `answers`: that each was right (`right`) or that the right label was another one; the status codes."
    other = lambda label: next(l for l in HAR_LABELS if l != label)
    with httpx.Client(base_url=url, timeout=60) as c:
        return [c.post('/feedback', json={'prediction_id': pid, 'label': label if right else other(label)}).status_code for pid, label in answers]

def test_the_canary_analysis_passes_the_stable_and_fails_the_canary(tmp_path, postgres):
    """A real stable and canary behind a real Prometheus, each scraped with its pods' track label. The canary serves a bigger model
    (ViT-B-32 shapes against the tiny stable: slower under the same load of 4 requests at a time), gets drifted inputs (the photos of one class), users correct its answers
    while they confirm the stable's, and then its prediction store (PostgreSQL) goes down, so its feedback is answered 503.
    Every query of the AnalysisTemplate then holds for the stable (judged as if it were the canary) and fails for the canary."""
    (tmp_path/'stable').mkdir(); (tmp_path/'canary').mkdir()
    stable_model = random_classifier(TINY_MODEL, tmp_path/'stable'/'model.pt')
    canary_model = random_classifier('ViT-B-32', tmp_path/'canary'/'model.pt', seed=1, zeroshot_init=False)
    drift_reference(stable_model, tmp_path/'stable', PHOTOS)
    drifted = drift_reference(canary_model, tmp_path/'canary', PHOTOS)  # the photos of the canary's most predicted class
    common = ['serve.monitor_window=90']
    stable, s_url, _ = start(stable_model, *common, f'serve.record_url=sqlite:///{tmp_path}/stable/records.db', f'serve.reference={tmp_path}/stable/reference.json')
    canary, c_url, _ = start(canary_model, *common, f'serve.record_url={postgres.url}', f'serve.reference={tmp_path}/canary/reference.json')
    s_traffic, c_traffic = PHOTOS * 2, (drifted * 90)[:90]  # the stable's: what its reference describes; the canary's: one predicted class
    answer_all(s_url, s_traffic[:32]); answer_all(c_url, c_traffic[:32])  # warm-up (a process's first requests take seconds), before any scrape
    prom, api = start_prometheus(tmp_path, {s_url.split('//')[1]: {'track': 'stable'}, c_url.split('//')[1]: {'track': 'canary'}})
    template = yaml.safe_load((K8S/'analysis-template.yaml').read_text())['spec']['metrics']
    down = False
    try:
        eventually(lambda: len(query(api, 'clip_har_request_seconds_count{route="/predict/image"}')) == 2)  # scraped once: rate() counts what follows
        s_answers, c_answers = answer_all(s_url, s_traffic), answer_all(c_url, c_traffic)
        assert feedback(s_url, s_answers[:20], right=True) == [200] * 20
        assert feedback(c_url, c_answers[:20], right=False) == [200] * 20
        postgres.ctl('stop', '-m', 'fast'); down = True  # the canary's store goes down
        first = feedback(c_url, c_answers[20:21], right=False)
        eventually(lambda: query(api, 'clip_har_requests_total{track="canary", route="/feedback", status="503"}'))  # scraped once: rate() sees the rest
        assert first + feedback(c_url, c_answers[21:40], right=False) == [503] * 20
        assert feedback(s_url, s_answers[20:40], right=True) == [200] * 20
        time.sleep(3)  # a few more scrapes of the final counts and gauges
        p99 = {t: query(api, f'histogram_quantile(0.99, sum by (le) (rate(clip_har_request_seconds_bucket{{track="{t}", route="/predict/image"}}[5m])))')
               for t in ('stable', 'canary')}
        print(f'p99 latency of /predict/image: stable {p99["stable"]} s, canary {p99["canary"]} s')
        results = {}
        for m in template:
            q = m['provider']['prometheus']['query']
            as_stable = eventually(lambda: query(api, q.replace('track="canary"', 'track="stable"')))
            as_canary = eventually(lambda: query(api, q))
            results[m['name']] = (as_stable, as_canary, holds(m['successCondition'], as_stable), holds(m['successCondition'], as_canary))
            print(f"{m['name']:38} {m['successCondition']:20} stable {as_stable} -> {results[m['name']][2]}   canary {as_canary} -> {results[m['name']][3]}")
    finally:
        prom.terminate(); prom.wait(30); stop(stable); stop(canary)
        if down: postgres.ctl('start')  # as the fixture left it
    assert len(results) == 4 and all(r[2] for r in results.values()) and not any(r[3] for r in results.values()), results

def test_prometheus_in_kubernetes_copies_the_track_label():
    "The in-cluster scrape config gives every series its pod's track label, which the analysis's queries select on."
    cfg = yaml.safe_load((ROOT/'docker'/'prometheus'/'kubernetes.yml').read_text())
    relabel = cfg['scrape_configs'][0]['relabel_configs']
    assert {'source_labels': ['__meta_kubernetes_pod_label_track'], 'target_label': 'track'} in relabel
    assert cfg['scrape_configs'][0]['kubernetes_sd_configs'] == [{'role': 'pod'}]

def test_the_log_shipper_reads_the_services_json_lines():
    """docker/logging/vector.yaml, statically (no Vector binary installs here): a connected graph from the API's containers to Loki and
    Elasticsearch that parses each line as JSON and labels by fields every line of the service has."""
    import logging
    from clip_har.serve import JsonFormatter
    v = yaml.safe_load((ROOT/'docker'/'logging'/'vector.yaml').read_text())
    ids = set(v['sources']) | set(v['transforms'])
    for name, part in {**v['transforms'], **v['sinks']}.items(): assert set(part['inputs']) <= ids, name
    assert {s['type'] for s in v['sinks'].values()} == {'loki', 'elasticsearch'}
    remap = next(t for t in v['transforms'].values() if t['type'] == 'remap')
    assert 'parse_json(.message)' in remap['source']
    line = json.loads(JsonFormatter().format(logging.LogRecord('clip_har.access', logging.INFO, __file__, 1, 'GET / 200', None, None)))
    labels = {f.strip('{} ') for f in v['sinks']['loki']['labels'].values()} - {'app'}
    assert labels <= set(line), (labels, line)  # the Loki labels are fields every line has
    assert 'time' in line and '.time' in remap['source']
