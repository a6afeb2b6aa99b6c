"""The prediction service as users run it: `clip-har serve` in its own process on 127.0.0.1, driven over real HTTP by
httpx, by `InferenceClient` and by Triton's `tritonclient` (the Open Inference Protocol, every body checked against its schema);
every endpoint, 69 kinds of bad input (23 of them the protocol's), keys and rate limits, two 1,000-request load runs,
graceful shutdown, several workers, and the deployment files."""
import base64, io, json, os, signal, struct, subprocess, threading, time, zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx, pytest
from PIL import Image

from conftest import BIN, ROOT, clip_har_here, env, start, stop, tool
from clip_har.core import TINY_MODEL, HAR_LABELS, fixtures_dir, file_sha256
from clip_har.serve import InferenceClient, ClientError, free_port, load_test

PHOTOS = sorted(fixtures_dir().rglob('*.jpg'))
JPG = PHOTOS[0].read_bytes()

def same(a, b, eps=1e-5) -> bool:
    "Equal predictions: the same labels in order, scores within `eps` (batched and single runs differ in the last digits)."
    return [p['class_name'] for p in a] == [p['class_name'] for p in b] and all(abs(p['score'] - q['score']) < eps for p, q in zip(a, b))

@pytest.fixture(scope='module')
def model(tmp_path_factory) -> Path:
    "The tiny test CLIP as a classifier file (random weights, the HAR labels)."
    from clip_har.inference import random_classifier
    return random_classifier(TINY_MODEL, tmp_path_factory.mktemp('serve')/'model.pt')

class _Images(BaseHTTPRequestHandler):
    "A little image host on localhost: a photo, a text file, a 404, and redirects to private addresses."
    def do_GET(self):
        routes = {'/photo.jpg': (200, 'image/jpeg', JPG), '/notes.txt': (200, 'text/plain', b'not an image'),
                  '/big.jpg': (200, 'image/jpeg', JPG * 400)}
        if self.path.startswith('/redirect'):
            self.send_response(302); self.send_header('Location', self.path.split('to=', 1)[1]); self.end_headers(); return
        status, ct, body = routes.get(self.path, (404, 'text/plain', b'missing'))
        self.send_response(status); self.send_header('Content-Type', ct); self.send_header('Content-Length', str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass

@pytest.fixture(scope='module')
def image_host():
    srv = ThreadingHTTPServer(('127.0.0.1', 0), _Images)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1]
    srv.shutdown()

@pytest.fixture(scope='module')
def server(model, image_host):
    "The service with URL input on (localhost trusted, as an internal image store would be) and a 1 MB body limit."
    proc, url, log = start(model, 'serve.allow_urls=true', 'serve.url_trusted_hosts=[localhost]', 'serve.max_body_mb=1',
                           'serve.max_batch_images=8', 'serve.url_max_mb=0.5')
    yield url
    assert stop(proc)
    lines = [l for l in log.read_text().splitlines() if l.startswith('{')]
    assert lines and all('image' not in json.loads(l) for l in lines)  # JSON access log lines, never image bytes

def b64(data: bytes) -> str: return base64.b64encode(data).decode()

def clip_files(tmp: Path) -> tuple[Path, Path]:
    frames = [Image.open(p).convert('RGB').resize((96, 96)) for p in PHOTOS[:6]]
    frames[0].save(tmp/'clip.gif', save_all=True, append_images=frames[1:], duration=100, loop=0)
    import av
    with av.open(str(tmp/'clip.mp4'), 'w') as c:
        st = c.add_stream('mpeg4', rate=5); st.width = st.height = 96; st.pix_fmt = 'yuv420p'
        for f in frames: c.mux(st.encode(av.VideoFrame.from_image(f)))
        c.mux(st.encode())
    return tmp/'clip.gif', tmp/'clip.mp4'

def test_every_endpoint_answers_as_documented(server, model, image_host, tmp_path):
    info = httpx.get(server + '/').json()
    assert info['ready'] and info['model'] == TINY_MODEL and info['backend'] == 'pytorch' and info['labels'] == list(HAR_LABELS)
    assert info['model_version'] == file_sha256(model)[:12] and info['url_input'] is True
    assert httpx.get(server + '/health').json() == {'status': 'ok'}
    assert httpx.get(server + '/ready').json()['ready'] is True
    paths = httpx.get(server + '/openapi.json').json()['paths']
    assert {'/', '/health', '/ready', '/metrics', '/predict', '/predict/image', '/predict/batch', '/predict/video', '/labels'} <= set(paths)
    assert 'swagger' in httpx.get(server + '/docs').text.lower()

    one = httpx.post(server + '/predict', json={'image': b64(JPG), 'top_k': 3}).json()
    assert [set(p) for p in one['predictions']] == [{'class_name', 'score'}] * 3
    assert one['predictions'][0]['score'] >= one['predictions'][1]['score'] and one['model_version'] == info['model_version']
    assert set(one['timings_ms']) == {'decode_ms', 'queue_ms', 'inference_ms', 'total_ms'}
    up = httpx.post(server + '/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}, params={'top_k': 3}).json()
    assert same(up['predictions'], one['predictions'])
    via_url = httpx.post(server + '/predict', json={'url': f'http://localhost:{image_host}/photo.jpg', 'top_k': 3}).json()
    assert same(via_url['predictions'], one['predictions'])
    batch = httpx.post(server + '/predict/batch', json={'images': [b64(p.read_bytes()) for p in PHOTOS[:6]], 'top_k': 2}).json()
    assert [len(r) for r in batch['results']] == [2] * 6 and same(batch['results'][0], one['predictions'][:2])
    for clip in clip_files(tmp_path):
        v = httpx.post(server + '/predict/video', files={'file': (clip.name, clip.read_bytes(), 'application/octet-stream')}).json()
        assert len(v['predictions']) == 5, v
    assert httpx.get(server + '/labels').json() == {'labels': list(HAR_LABELS), 'trained_labels': list(HAR_LABELS), 'open_vocabulary': False}
    metrics = httpx.get(server + '/metrics').text
    for name in ('clip_har_requests_total{method="POST",route="/predict",status="200"}', 'clip_har_request_seconds_bucket',
                 'clip_har_batch_size_bucket', 'clip_har_inference_seconds_count', 'clip_har_model_ready 1.0'):
        assert name in metrics, name

def test_the_client_against_the_server(server, image_host, tmp_path):
    with InferenceClient(server) as client:
        assert client.health() and client.ready() and client.info()['ready']
        res = client.predict_from_image_path(PHOTOS[0])
        print(f"Top prediction: {res['predictions'][0]['class_name']} ({res['predictions'][0]['score']:.4f})")
        assert same(res['predictions'], client.predict_from_bytes(JPG)['predictions'])
        assert same(client.predict_from_image_url(f'http://localhost:{image_host}/photo.jpg', top_k=2)['predictions'], res['predictions'][:2])
        assert len(client.predict_batch(PHOTOS[:3] + [JPG], top_k=1)['results']) == 4
        assert len(client.predict_video(clip_files(tmp_path)[0], top_k=2)['predictions']) == 2
        assert client.labels()['labels'] == list(HAR_LABELS)
        with pytest.raises(ClientError, match='HTTP 422: the upload: not a readable image'):
            client.request('POST', '/predict/image', files={'file': ('the upload', b'abc', 'image/png')})
        with pytest.raises(ClientError, match='HTTP 403: label editing is off'):
            client.set_labels(['a', 'b'])

def _png_header(w: int, h: int) -> bytes:
    "A PNG that declares w x h pixels and carries a few bytes of data."
    def chunk(kind, data): return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b'')

def _bad_requests(image_host):
    bomb = io.BytesIO(); Image.new('L', (12_000, 12_000)).save(bomb, 'PNG')
    corrupt = JPG[:2] + bytes((i * 37) % 256 for i in range(3000))
    host = f'http://localhost:{image_host}'
    up = lambda data, name='a.jpg', ct='image/jpeg', **kw: dict(method='POST', path='/predict/image', files={'file': (name, data, ct)}, **kw)
    js = lambda body, path='/predict': dict(method='POST', path=path, json=body)
    raw = lambda body, ct, path='/predict': dict(method='POST', path=path, content=body, headers={'Content-Type': ct})
    def chunked():
        yield b'{"image": "'
        for _ in range(1200): yield b'A' * 1024
        yield b'"}'
    return {
        'truncated JPEG': (up(JPG[:len(JPG) // 3]), 422), 'corrupt JPEG': (up(corrupt), 422), 'PNG bomb': (up(bomb.getvalue(), 'b.png', 'image/png'), 413),
        'zero bytes': (up(b''), 422), 'text sent as text/plain': (up(b'hello', 'a.txt', 'text/plain'), 415),
        'text sent as a JPEG': (up(b'hello world'), 422), 'huge dimensions': (up(_png_header(100_000, 100_000), 'h.png', 'image/png'), 413),
        'huge dimensions under PIL limit': (up(_png_header(9_000, 9_000), 'h.png', 'image/png'), 413),
        'bad base64': (js({'image': 'not*base64!'}), 422), 'base64 of text': (js({'image': b64(b'hello')}), 422),
        'empty base64': (js({'image': ''}), 422), 'image is a number': (js({'image': 42}), 422),
        'bad JSON': (raw(b'{"image": ', 'application/json'), 422), 'JSON array': (js([1, 2]), 422),
        'non-UTF-8 JSON': (raw(b'{"image": "\xff\xfe"}', 'application/json'), 400),
        'wrong content type on /predict': (raw(json.dumps({'image': b64(JPG)}).encode(), 'text/plain'), 415),
        'multipart to /predict': (dict(method='POST', path='/predict', files={'file': ('a.jpg', JPG, 'image/jpeg')}), 415),
        'JSON to /predict/image': (js({'image': b64(JPG)}, '/predict/image'), 415),
        'oversized body': (up(b'\xff' * (2 * 2**20)), 413), 'oversized chunked body': (raw(chunked(), 'application/json'), 413),
        'URL to 127.0.0.1': (js({'url': f'http://127.0.0.1:{image_host}/photo.jpg'}), 400),
        'URL to metadata': (js({'url': 'http://169.254.169.254/latest/meta-data/'}), 400),
        'URL to 10.0.0.1': (js({'url': 'http://10.0.0.1/x.jpg'}), 400), 'URL to [::1]': (js({'url': 'http://[::1]/x.jpg'}), 400),
        'file URL': (js({'url': 'file:///etc/passwd'}), 400), 'ftp URL': (js({'url': 'ftp://example.com/a.jpg'}), 400),
        'redirect to metadata': (js({'url': f'{host}/redirect?to=http://169.254.169.254/latest/'}), 400),
        'redirect to loopback': (js({'url': f'{host}/redirect?to=http://127.0.0.1:{image_host}/photo.jpg'}), 400),
        'URL that is missing': (js({'url': f'{host}/nothing.jpg'}), 422), 'URL to a text file': (js({'url': f'{host}/notes.txt'}), 422),
        'URL too big': (js({'url': f'{host}/big.jpg'}), 413), 'unresolvable host': (js({'url': 'http://no-such-host.invalid/a.jpg'}), 400),
        'unknown field': (js({'image': b64(JPG), 'colour': 'red'}), 422), 'image and url': (js({'image': b64(JPG), 'url': f'{host}/photo.jpg'}), 422),
        'neither image nor url': (js({}), 422), 'top_k zero': (js({'image': b64(JPG), 'top_k': 0}), 422),
        'top_k not a number': (up(JPG, params={'top_k': 'abc'}), 422), 'top_k huge': (js({'image': b64(JPG), 'top_k': 5000}), 422),
        'batch too big': (js({'images': [b64(JPG)] * 9}, '/predict/batch'), 413), 'empty batch': (js({'images': []}, '/predict/batch'), 422),
        'batch with a bad image': (js({'images': [b64(JPG), b64(b'junk')]}, '/predict/batch'), 422),
        'video that is not one': (dict(method='POST', path='/predict/video', files={'file': ('v.mp4', b'not a video', 'video/mp4')}), 422),
        'video as .txt': (dict(method='POST', path='/predict/video', files={'file': ('v.txt', b'abc', 'text/plain')}), 415),
        'labels without admin keys': (dict(method='PUT', path='/labels', json={'labels': ['a']}), 403),
        'unknown route': (dict(method='GET', path='/predict/everything'), 404), 'wrong method': (dict(method='GET', path='/predict'), 405),
        **_bad_v2_requests(),
    }

def _bad_v2_requests() -> dict:
    "What can go wrong with the Open Inference Protocol's requests (the server takes 8 images a request and 1 MB bodies)."
    from clip_har.protocol import Tensor, binary_infer_request
    image = lambda data=b64(JPG), **kw: {'name': 'image', 'datatype': 'BYTES', 'shape': [1], 'data': [data], **kw}
    pixels = lambda shape, data: {'name': 'pixels', 'datatype': 'FP32', 'shape': shape, 'data': data}
    v2 = lambda body, path=f'/v2/models/{TINY_MODEL}/infer': dict(method='POST', path=path, json=body)
    raw = lambda content, headers: dict(method='POST', path=f'/v2/models/{TINY_MODEL}/infer', content=content, headers=headers)
    body, headers = binary_infer_request([Tensor('image', 'BYTES', [1], [JPG])])
    n = int(headers['Inference-Header-Content-Length'])
    liar = body[:n].replace(f'"binary_data_size": {len(JPG) + 4}'.encode(), b'"binary_data_size": 14') + struct.pack('<I', 1000) + b'0123456789'
    return {
        'V2 unknown model': (dict(method='GET', path='/v2/models/nope'), 404), 'V2 infer on an unknown model': (v2({'inputs': [image()]}, '/v2/models/nope/infer'), 404),
        'V2 unknown version': (v2({'inputs': [image()]}, f'/v2/models/{TINY_MODEL}/versions/0/infer'), 404),
        'V2 image sent as FP32': (v2({'inputs': [image(datatype='FP32')]}), 400), 'V2 pixels of the wrong shape': (v2({'inputs': [pixels([1, 3, 8, 8], [0.0] * 192)]}), 400),
        'V2 pixels that are not numbers': (v2({'inputs': [pixels([1, 1], ['a'])]}), 400), 'V2 bad base64': (v2({'inputs': [image('not*base64!')]}), 422),
        'V2 base64 of text': (v2({'inputs': [image(b64(b'hello'))]}), 422), 'V2 text content_type': (v2({'inputs': [image('hi', parameters={'content_type': 'str'})]}), 400),
        'V2 header longer than the body': (raw(body, {**headers, 'Inference-Header-Content-Length': str(len(body) + 1)}), 400),
        'V2 header length not a number': (raw(body, {**headers, 'Inference-Header-Content-Length': 'ten'}), 400),
        'V2 bytes beyond the declared ones': (raw(body + b'extra', headers), 400), 'V2 fewer bytes than declared': (raw(body[:-10], headers), 400),
        'V2 element longer than its data': (raw(liar, {**headers, 'Inference-Header-Content-Length': str(len(liar) - 14)}), 400),
        'V2 oversized body': (raw(body + b'\0' * 2 * 2**20, headers), 413), 'V2 NaN pixels': (raw(b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 64, 64], "data": [' + b', '.join([b'NaN'] * 12288) + b']}]}', {}), 400),
        'V2 nine images': (v2({'inputs': [{**image(), 'shape': [9], 'data': [b64(JPG)] * 9}]}), 413),
        'V2 two inputs': (v2({'inputs': [image(), pixels([1, 3, 64, 64], [0.0] * 12288)]}), 400), 'V2 no inputs': (v2({'inputs': []}), 400),
        'V2 unknown output': (v2({'inputs': [image()], 'outputs': [{'name': 'embedding'}]}), 400), 'V2 top_k zero': (v2({'inputs': [image()], 'parameters': {'top_k': 0}}), 400),
        'V2 not JSON': (raw(b'\x00\x01', {}), 400), 'V2 GET on infer': (dict(method='GET', path=f'/v2/models/{TINY_MODEL}/infer'), 405),
    }

def test_bad_input_gets_4xx_json_and_the_server_stays_up(server, image_host):
    cases = _bad_requests(image_host)
    assert len(cases) >= 30
    seen, wrong = {}, []
    with httpx.Client(base_url=server, timeout=30) as c:
        for name, (req, want) in cases.items():
            kw = {k: v for k, v in req.items() if k not in ('method', 'path')}
            r = c.request(req['method'], req['path'], **kw)
            body = r.json()
            seen[name] = (r.status_code, body.get('error', '')[:90])
            if not (r.status_code == want and body['status'] == want and body['error']): wrong.append((name, want, r.status_code, body))
            assert 'Traceback' not in r.text and 'File "' not in r.text
    for name, (status, msg) in seen.items(): print(f'{status}  {name:34} {msg}')
    assert not wrong, wrong
    assert all(400 <= s < 500 for s, _ in seen.values())
    assert httpx.get(server + '/health').json() == {'status': 'ok'}
    assert httpx.post(server + '/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}).status_code == 200
    assert 'status="500"' not in httpx.get(server + '/metrics').text

def test_a_kept_alive_connection_idle_for_6_seconds_still_answers(server):
    "A client or load balancer reuses idle connections; uvicorn's own 5 s keep-alive closed them under it (ReadError under load): keep_alive_s is 65."
    import http.client
    from urllib.parse import urlparse
    u = urlparse(server)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=30)  # one connection, never reopened: a closed one fails the request
    try:
        for wait in (0, 6):
            time.sleep(wait); c.request('GET', '/health')
            r = c.getresponse(); r.read()
            assert r.status == 200 and r.getheader('connection', '').lower() != 'close', (wait, r.status, r.getheaders())
    finally: c.close()

def test_load_1000_requests_at_concurrency_32(server):
    "Uploads to /predict/image (the protocol's infer route gets its own 1,000 below)."
    r = load_test(server, [p.read_bytes() for p in PHOTOS], n=1000, concurrency=32)
    print(f"1000 requests, concurrency 32: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}")
    assert r['errors'] == 0 and r['statuses'] == {'200': 1000}, r['statuses']  # a client-side failure is named: ReadError, ConnectError...
    sizes = [l for l in httpx.get(server + '/metrics').text.splitlines() if l.startswith('clip_har_batch_size_bucket{le="1.0"}') or l.startswith('clip_har_batch_size_count')]
    one, total = (float(l.split()[-1]) for l in sizes)
    print(f'{total:.0f} forward passes so far, {one:.0f} of them a single image')
    assert one < total  # concurrent requests were batched
    written = lambda: float(next((l.split()[-1] for l in httpx.get(server + '/metrics').text.splitlines()
                                  if l.startswith('clip_har_prediction_records_total{outcome="written"}')), 0))
    deadline = time.time() + 30
    while written() < 1000 and time.time() < deadline: time.sleep(0.2)
    assert written() >= 1000  # every answer recorded (off the request path), none dropped or failed
    assert 'outcome="failed"' not in httpx.get(server + '/metrics').text and 'outcome="dropped"' not in httpx.get(server + '/metrics').text

def test_keys_and_rate_limits(model):
    proc, url, _ = start(model, 'serve.rate_limit=6', 'serve.rate_burst=3',  # a token per 10 s: no machine is slow enough to refill during the burst
                         extra_env={'CLIP_HAR_API_KEYS': 'user-1,user-2', 'CLIP_HAR_ADMIN_KEYS': 'admin-1'})
    try:
        files = {'file': ('a.jpg', JPG, 'image/jpeg')}
        assert httpx.post(url + '/predict/image', files=files).status_code == 401
        r = httpx.post(url + '/predict/image', files=files, headers={'X-API-Key': 'user-3'})
        assert r.status_code == 401 and r.headers['www-authenticate'] == 'ApiKey'
        assert httpx.get(url + '/health').status_code == 200 and httpx.get(url + '/').json()['auth'] is True
        codes = [httpx.post(url + '/predict/image', files=files, headers={'X-API-Key': 'user-1'}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429], codes
        r = httpx.post(url + '/predict/image', files=files, headers={'X-API-Key': 'user-1'})
        assert r.status_code == 429 and int(r.headers['retry-after']) >= 1 and 'rate limit' in r.json()['error']
        v2, body = f'/v2/models/{TINY_MODEL}', {'inputs': [{'name': 'image', 'datatype': 'BYTES', 'shape': [1], 'data': [b64(JPG)]}]}
        assert httpx.post(url + v2 + '/infer', json=body, headers={'X-API-Key': 'user-1'}).status_code == 429  # the protocol's routes share the bucket
        assert httpx.post(url + v2 + '/infer', json=body).status_code == 401 and httpx.get(url + v2).status_code == 401
        assert [httpx.get(url + p).status_code for p in ('/v2', '/v2/health/live', '/v2/health/ready')] == [200] * 3  # probes need no key
        assert httpx.post(url + '/predict/image', files=files, headers={'X-API-Key': 'user-2'}).status_code == 200  # its own bucket
        assert httpx.put(url + '/labels', json={'labels': ['a', 'b']}, headers={'X-API-Key': 'user-2'}, timeout=60).status_code == 403
        r = httpx.put(url + '/labels', json={'labels': ['a', 'a']}, headers={'X-API-Key': 'admin-1'}, timeout=60)
        assert r.status_code == 422 and 'duplicated labels' in r.json()['error']
        r = httpx.put(url + '/labels', json={'labels': ['riding a horse', 'reading']}, headers={'X-API-Key': 'admin-1'}, timeout=60)
        assert r.json()['labels'] == ['riding a horse', 'reading']
        meta = httpx.get(url + v2, headers={'X-API-Key': 'admin-1'}).json()  # the protocol's metadata follows the label set in use
        assert json.loads(meta['properties']['labels']) == ['riding a horse', 'reading'] and meta['outputs'][0]['shape'] == [-1, 2]
        limited = lambda: sum(float(l.split()[-1]) for l in httpx.get(url + '/metrics').text.splitlines()
                              if l.startswith('clip_har_requests_total{') and 'route="/predict/image"' in l and 'status="429"' in l)
        before = limited()
        with InferenceClient(url, api_key='user-2', backoff=0.2) as client:  # user-2 has 2 tokens left: the third call waits out Retry-After, then succeeds
            got = [client.predict_from_bytes(JPG)['predictions'][0]['class_name'] for _ in range(3)]
        assert set(got) <= {'riding a horse', 'reading'}
        assert limited() > before  # the client was told 429 and waited: it did not merely find tokens left
    finally: stop(proc)

def test_graceful_shutdown_finishes_in_flight_requests(model):
    "SIGTERM while an upload is still arriving: the server stops accepting, finishes that request (200), then exits."
    proc, url, _ = start(model)
    boundary, half = 'clip-har-test', len(JPG) // 2
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode()
    first_half_sent, result = threading.Event(), {}
    def slow_body():  # the request is in flight, half uploaded, when SIGTERM arrives
        yield head + JPG[:half]
        first_half_sent.set(); time.sleep(2)
        yield JPG[half:] + f'\r\n--{boundary}--\r\n'.encode()
    def call():
        result['r'] = httpx.post(url + '/predict/image', content=slow_body(), timeout=60,
                                 headers={'Content-Type': f'multipart/form-data; boundary={boundary}'})
    t = threading.Thread(target=call); t.start()
    assert first_half_sent.wait(30)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert result['r'].status_code == 200 and len(result['r'].json()['predictions']) == 5, result['r'].text
    assert proc.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.ConnectError): httpx.get(url + '/health', timeout=2)

def test_several_workers_share_the_metrics(model, tmp_path):
    proc, url, _ = start(model, workers=2, extra_env={'TMPDIR': str(tmp_path)})
    try:
        prom = lambda: list(tmp_path.glob('clip-har-prom-*'))
        assert len(prom()) == 1  # the workers' metric files
        with httpx.Client(base_url=url) as c:
            for _ in range(12): assert c.post('/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}).status_code == 200
        line = next(l for l in httpx.get(url + '/metrics').text.splitlines() if l.startswith('clip_har_images_total'))
        assert float(line.split()[-1]) == 12.0, line
    finally: assert stop(proc)
    assert prom() == []  # removed when the service stops

def test_serve_errors_are_one_line(tmp_path):
    r = clip_har_here('serve', '--model', tmp_path/'none.pt')
    assert r.returncode == 2 and 'none.pt: no such model file or export folder' in r.stderr
    r = clip_har_here('serve', '--model', tmp_path, '--port', '99999')
    assert r.returncode == 2 and "serve.port" in r.stderr

def test_deployment_files_are_valid():
    "The serve image, compose file and Kubernetes manifests (validated offline against the Kubernetes schemas)."
    import yaml, kubernetes_validate
    docker = ROOT/'docker'
    serve = (docker/'serve.Dockerfile').read_text()
    assert 'USER ' in serve and 'HEALTHCHECK' in serve and '/health' in serve and 'clip-har", "serve' in serve
    compose = yaml.safe_load((docker/'compose.yaml').read_text())
    assert {'api', 'dashboard', 'mlflow'} <= set(compose['services'])
    assert all('healthcheck' in s for s in compose['services'].values())
    assert ':?' in compose['services']['dashboard']['environment']['CLIP_HAR_DASHBOARD_TOKEN']  # compose refuses to start it without one
    assert {'prometheus', 'alertmanager', 'grafana'} <= set(compose['services'])  # monitoring: docker/prometheus, docker/grafana
    assert ':?' in compose['services']['grafana']['environment']['GF_SECURITY_ADMIN_PASSWORD']
    assert 'monitor:/app/monitor' in compose['services']['api']['volumes']  # prediction records outlive the container
    for name in ('dashboard', 'mlflow', 'prometheus', 'alertmanager', 'grafana'):  # no authentication of their own (or a password only): never published beyond this machine
        assert all(str(port).startswith('127.0.0.1:') for port in compose['services'][name]['ports']), compose['services'][name]['ports']
    docs = [d for f in sorted((docker/'k8s').glob('*.yaml')) for d in yaml.safe_load_all(f.read_text())
            if d and not d['apiVersion'].startswith(('argoproj.io/', 'serving.kserve.io/'))]  # custom resources: tests/test_release.py
    kinds = {d['kind'] for d in docs}
    assert {'Deployment', 'Service', 'HorizontalPodAutoscaler'} <= kinds
    for d in docs: kubernetes_validate.validate(d, '1.31.0', strict=True)
    deployments = {d['metadata']['name']: d['spec']['template']['spec'] for d in docs if d['kind'] == 'Deployment'}
    assert set(deployments) == {'clip-har-api', 'clip-har-dashboard', 'clip-har-redis'}
    for name, spec in deployments.items():  # the same security context for all
        assert spec['securityContext']['runAsNonRoot'] is True, name
        sc = spec['containers'][0]['securityContext']
        assert (sc['allowPrivilegeEscalation'], sc['readOnlyRootFilesystem'], sc['capabilities']['drop']) == (False, True, ['ALL']), name
    assert next(d for d in docs if d['kind'] == 'Service' and d['metadata']['name'] == 'clip-har-dashboard')['spec']['type'] == 'ClusterIP'
    dep = deployments['clip-har-api']
    c = dep['containers'][0]
    assert c['livenessProbe']['httpGet']['path'] == '/health' and c['readinessProbe']['httpGet']['path'] == '/ready'
    assert dep['securityContext']['runAsNonRoot'] is True
    bad = {**docs[0], 'spec': {**docs[0]['spec'], 'replicas': 'three'}}
    with pytest.raises(kubernetes_validate.ValidationError): kubernetes_validate.validate(bad, '1.31.0', strict=True)

# --- The Open Inference Protocol, spoken by a client this project did not write -------------------------------------------

OIP = ROOT/'tests'/'schemas'/'open-inference-protocol'/'open_inference_rest.yaml'
V2 = f'/v2/models/{TINY_MODEL}'

def oip_validator(name: str):
    "A jsonschema validator for `components.schemas.<name>` of the protocol's OpenAPI file (its $refs resolve within the file)."
    import jsonschema, yaml
    doc = yaml.safe_load(OIP.read_text())
    return jsonschema.Draft7Validator({**doc, '$ref': f'#/components/schemas/{name}'})

def _triton(url: str):
    import tritonclient.http as triton
    return triton, triton.InferenceServerClient(url.removeprefix('http://'), connection_timeout=30, network_timeout=60)

def test_tritonclient_against_the_service(server, model, tmp_path):
    "tritonclient[http]: health, metadata, a binary BYTES image and FP32 pixels give /predict/image's answer; an unknown model is its error."
    import numpy as np
    from tritonclient.utils import InferenceServerException
    from clip_har.data import image_batch
    triton, client = _triton(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata() == {'name': 'clip_har', 'version': httpx.get(server + '/').json()['version'], 'extensions': ['binary_tensor_data']}
    meta = client.get_model_metadata(TINY_MODEL)
    version = httpx.get(server + '/').json()['model_version']
    assert meta['versions'] == [version] and client.is_model_ready(TINY_MODEL) and client.is_model_ready(TINY_MODEL, version)
    assert json.loads(meta['properties']['labels']) == list(HAR_LABELS)
    preprocess = json.loads(meta['properties']['preprocess'])
    size = preprocess['size']
    assert meta['inputs'] == [{'name': 'image', 'datatype': 'BYTES', 'shape': [-1]}, {'name': 'pixels', 'datatype': 'FP32', 'shape': [-1, 3, size, size]}]
    assert meta['outputs'] == [{'name': 'probabilities', 'datatype': 'FP32', 'shape': [-1, 15]}, {'name': 'labels', 'datatype': 'BYTES', 'shape': [-1, -1]}]

    photos = PHOTOS[::3]  # one photo per class
    reference = [httpx.post(server + '/predict/image', params={'top_k': 15}, files={'file': ('a.jpg', p.read_bytes(), 'image/jpeg')}).json() for p in photos]
    want = np.array([[{q['class_name']: q['score'] for q in r['predictions']}[l] for l in HAR_LABELS] for r in reference])
    probs, top1 = [], []
    for p in photos:  # an encoded image as a binary BYTES tensor (tritonclient's default: binary outputs too)
        inp = triton.InferInput('image', [1], 'BYTES'); inp.set_data_from_numpy(np.array([p.read_bytes()], dtype=np.object_), binary_data=True)
        res = client.infer(TINY_MODEL, [inp])
        probs.append(res.as_numpy('probabilities')[0]); top1.append(res.as_numpy('labels')[0, 0].decode())
    assert np.abs(np.array(probs) - want).max() < 1e-5 and top1 == [r['predictions'][0]['class_name'] for r in reference]
    pixels = image_batch([p.read_bytes() for p in photos[:4]], preprocess).numpy()  # the model's own preprocessing, client side
    for binary in (False, True):  # FP32 pixels, as JSON and as binary data; outputs as JSON
        inp = triton.InferInput('pixels', list(pixels.shape), 'FP32'); inp.set_data_from_numpy(pixels, binary_data=binary)
        outs = [triton.InferRequestedOutput('probabilities', binary_data=False), triton.InferRequestedOutput('labels', binary_data=False)]
        res = client.infer(TINY_MODEL, [inp], model_version=version, outputs=outs, request_id='px')
        assert np.abs(res.as_numpy('probabilities') - want[:4]).max() < 1e-5, binary
        assert [l[0] for l in res.as_numpy('labels')] == top1[:4] and res.get_response()['id'] == 'px'
    ids = res.get_response()['parameters']['prediction_ids'].split(',')
    assert len(ids) == 4
    fb = httpx.post(server + '/feedback', json={'prediction_id': ids[0], 'label': top1[0]})
    assert fb.status_code == 200 and fb.json()['correct'] is True  # the protocol's answers are recorded like the API's
    with pytest.raises(InferenceServerException) as e: client.get_model_metadata('no-such-model')
    assert "unknown model 'no-such-model'" in e.value.message() and e.value.status() == '404'
    with pytest.raises(InferenceServerException) as e: client.infer('no-such-model', [inp])
    assert "unknown model 'no-such-model'" in e.value.message()
    client.close()
    assert 'clip_har_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}' in httpx.get(server + '/metrics').text

def _v2_bodies(server) -> dict:
    "Every kind of JSON body the /v2 routes return, with the schema it must satisfy."
    b = base64.b64encode(JPG).decode()
    infer = lambda body, path=V2 + '/infer': httpx.post(server + path, json=body)
    image = {'inputs': [{'name': 'image', 'datatype': 'BYTES', 'shape': [1], 'data': [b], 'parameters': {'content_type': 'base64'}}]}
    return {
        'server metadata': (httpx.get(server + '/v2'), 'metadata_server_response'),
        'model metadata': (httpx.get(server + V2), 'metadata_model_response'),
        'model metadata, unknown model': (httpx.get(server + '/v2/models/nope'), 'metadata_model_error_response'),
        'model metadata, unknown version': (httpx.get(server + V2 + '/versions/9'), 'metadata_model_error_response'),
        'inference': (infer({**image, 'id': '7'}), 'inference_response'),
        'inference, outputs asked': (infer({**image, 'outputs': [{'name': 'labels'}]}), 'inference_response'),
        'inference error: unknown model': (infer(image, '/v2/models/nope/infer'), 'inference_error_response'),
        'inference error: wrong datatype': (infer({'inputs': [{**image['inputs'][0], 'datatype': 'FP32'}]}), 'inference_error_response'),
        'inference error: bad base64': (infer({'inputs': [{**image['inputs'][0], 'data': ['@@@']}]}), 'inference_error_response'),
        'inference error: not JSON': (httpx.post(server + V2 + '/infer', content=b'{'), 'inference_error_response'),
    }

def test_every_v2_body_validates_against_the_protocol_schema(server):
    "Successes and errors alike satisfy components.schemas of open_inference_rest.yaml; a body missing a required field does not."
    import jsonschema
    bodies = _v2_bodies(server)
    for name, (r, schema) in bodies.items():
        assert (r.status_code == 200) == ('error' not in schema), (name, r.status_code, r.text[:300])
        oip_validator(schema).validate(r.json())
        print(f'{r.status_code}  {name:36} valid {schema}')
    for name, field in (('inference', 'model_name'), ('model metadata', 'platform'), ('server metadata', 'extensions')):
        broken = {k: v for k, v in bodies[name][0].json().items() if k != field}
        with pytest.raises(jsonschema.ValidationError, match=f"'{field}' is a required property"):
            oip_validator(bodies[name][1]).validate(broken)
    out = bodies['inference'][0].json()['outputs'][0]
    with pytest.raises(jsonschema.ValidationError, match="'data' is a required property"):
        oip_validator('inference_response').validate({**bodies['inference'][0].json(), 'outputs': [{k: v for k, v in out.items() if k != 'data'}]})

def test_load_1000_v2_infer_requests_at_concurrency_32(server):
    r = load_test(server, [p.read_bytes() for p in PHOTOS], n=1000, concurrency=32, v2_model=TINY_MODEL)
    print(f"1000 V2 infer requests (binary BYTES), concurrency 32: {r['requests_per_s']:.1f} req/s, p50 {r['p50_ms']:.1f} ms, "
          f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}")
    assert r['errors'] == 0 and r['statuses'] == {'200': 1000}, r['statuses']

def test_every_line_the_service_writes_is_json(model):
    "Start, answers, refusals, a warning and a stop: every line of the service's output is one JSON object with time, level, logger and message."
    proc, url, log = start(model, 'serve.max_body_mb=1')
    with httpx.Client(base_url=url, timeout=30) as c:
        ok = c.post('/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}, headers={'X-Request-ID': 'req-ok'})
        bad = c.post('/predict/image', files={'file': ('a.jpg', b'not an image', 'image/jpeg')}, headers={'X-Request-ID': 'req-bad'})
        big = c.post('/predict', content=b'x' * (2 * 2**20), headers={'Content-Type': 'application/json'})
        missing = c.get('/nowhere')
    assert (ok.status_code, bad.status_code, big.status_code, missing.status_code) == (200, 422, 413, 404)
    assert stop(proc)
    lines = log.read_text().splitlines()
    records = [json.loads(l) for l in lines]  # raises on any line that is not JSON
    assert len(records) >= 8 and all({'time', 'level', 'logger', 'message'} <= set(r) for r in records), lines[:5]
    loggers = {r['logger'] for r in records}
    assert {'uvicorn.error', 'clip_har', 'clip_har.access', 'py.warnings'} <= loggers, loggers  # uvicorn's start and stop, the model loading, the requests, a warning
    access = {r['request_id']: r for r in records if r['logger'] == 'clip_har.access' and 'request_id' in r}
    assert access['req-ok']['status'] == 200 and access['req-bad']['status'] == 422 and access['req-ok']['message'] == 'POST /predict/image 200'
    assert any(r['message'].startswith('Finished server process') for r in records)  # the stop is logged too
    print(f'{len(records)} lines, all JSON, from {sorted(loggers)}')

def test_two_replicas_share_one_rate_limit_through_redis(model):
    "Two `clip-har serve` processes (replicas) and a real redis-server: a client alternating between them gets its burst of 3 once, not twice."
    port = free_port()
    redis = subprocess.Popen([tool('redis-server'), '--port', str(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], stdout=subprocess.DEVNULL)
    shared = ['serve.rate_limit=6', 'serve.rate_burst=3', f'serve.rate_limit_url=redis://127.0.0.1:{port}/0']  # a token per 10 s
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool: replicas = list(pool.map(lambda _: start(model, *shared, extra_env={'CLIP_HAR_API_KEYS': 'k1,k2'}), range(2)))
    try:
        post = lambda url, key: httpx.post(url + '/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}, headers={'X-API-Key': key}).status_code
        codes = [post(replicas[i % 2][1], 'k1') for i in range(6)]
        assert codes == [200, 200, 200, 429, 429, 429], codes  # per-process buckets would give 3 on each replica
        assert post(replicas[1][1], 'k2') == 200  # another key has its own bucket
        redis.terminate(); redis.wait(10)
        assert post(replicas[0][1], 'k1') == 200  # Redis gone: the API keeps answering, unlimited (and says so in its log)
    finally:
        for proc, _, _ in replicas: stop(proc)
        if redis.poll() is None: redis.terminate(); redis.wait(10)
    assert 'rate limits are not applied: Redis is unreachable' in replicas[0][2].read_text()
