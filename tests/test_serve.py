"""`tipslab serve` on loopback: text and region queries, the image endpoints, several indexes, bad
requests answered 4xx with a message, and concurrent requests giving the answers of serial ones."""

import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image
from test_search import save_tiny

from tipslab.retrieval.index_dir import build_index
from tipslab.retrieval.service import load_indexes
from tipslab.retrieval.service_app import ServerThread


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = save_tiny(root / "model")
    build_index(model, "scenes:val:8", root / "scenes", progress=False)
    shutil.copytree(root / "scenes", root / "copy" / "scenes")  # a second index of the same name
    indexes = load_indexes([root / "scenes", root / "copy" / "scenes"])
    with ServerThread(indexes) as server:
        yield server, indexes


def call(server, path, body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
            kind = response.headers["content-type"]
            return response.status, json.loads(payload) if kind.startswith("application/json") else payload
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def announce_oversized_body(server):
    """A POST whose headers announce 2 MiB and whose body never comes: the answer must come from
    the headers alone (sending the 2 MiB races the server's early close: a broken pipe)."""
    import http.client
    import urllib.parse

    url = urllib.parse.urlparse(server.url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        connection.putrequest("POST", "/api/search")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(2 << 20))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_health_and_index_info(served):
    server, indexes = served
    assert call(server, "/api/health") == (200, {"status": "ok", "indexes": ["scenes", "scenes-2"]})
    status, info = call(server, "/api/indexes")
    assert status == 200 and [i["images"] for i in info["indexes"]] == [8, 8]
    assert info["indexes"][0]["vectors"] == 8 * 64 and "key_prefix" in info["indexes"][0]["filters"]
    # Two indexes built with the same weights share one model and its lock.
    assert indexes["scenes"].searcher.loaded is indexes["scenes-2"].searcher.loaded
    assert indexes["scenes"].model_lock is indexes["scenes-2"].model_lock


def test_text_query_and_image_endpoints(served):
    server, _ = served
    status, answer = call(server, "/api/search", {"index": "scenes", "query": "a red circle", "k": 4, "threshold": 0})
    assert status == 200, answer
    hits = answer["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and answer["notes"] == []
    confidences = [h["confidence"] for h in hits]
    assert confidences == sorted(confidences, reverse=True) and all(0 <= c <= 1 for c in confidences)
    for hit in hits:
        x0, y0, x1, y1 = hit["box"]
        assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112 and hit["image_key"].startswith("scenes:val/")
    first = hits[0]
    status, png = call(server, first["image_url"])
    assert status == 200 and Image.open(io.BytesIO(png)).size == (112, 112)
    status, png = call(server, first["heatmap_url"])
    heat = Image.open(io.BytesIO(png))
    assert status == 200 and heat.mode == "RGBA" and heat.size == (112, 112)
    status, png = call(server, first["crop_url"])
    x0, y0, x1, y1 = first["box"]
    assert status == 200 and Image.open(io.BytesIO(png)).size == (x1 - x0, y1 - y0)


def test_threshold_and_filters_can_leave_fewer_hits_than_k(served):
    server, _ = served
    status, answer = call(server, "/api/search", {"index": "scenes", "query": "red circle", "k": 5, "threshold": 1.0})
    assert status == 200 and answer["results"] == []  # a softmax share never reaches 1
    assert "only 0 of the 5 regions" in answer["notes"][0]
    status, answer = call(server, "/api/search", {"index": "scenes", "query": "red circle", "k": 5, "threshold": 0,
                                                  "filters": {"key_prefix": "scenes:val/000003"}})
    assert status == 200 and {h["image_key"] for h in answer["results"]} == {"scenes:val/000003"}
    assert len(answer["results"]) <= 2 and "only" in answer["notes"][0]  # one image, two regions at most


def test_region_query_finds_other_regions_like_it(served):
    server, _ = served
    _, text = call(server, "/api/search", {"index": "scenes", "query": "a blue square", "k": 1, "threshold": 0})
    seed = text["results"][0]
    status, answer = call(server, "/api/search", {"index": "scenes", "k": 6,
                                                  "region": {"image_id": seed["image_id"], "box": seed["box"]}})
    assert status == 200, answer
    assert answer["query"].startswith("region") and len(answer["results"]) == 6
    scores = [h["score"] for h in answer["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(not (h["image_id"] == seed["image_id"] and h["box"] == seed["box"]) for h in answer["results"])
    assert "region=" in answer["results"][0]["heatmap_url"]
    assert call(server, answer["results"][0]["heatmap_url"])[0] == 200


@pytest.mark.parametrize("body, status, message", [
    ({"index": "scenes", "query": ""}, 400, "query: expected non-empty text"),
    ({"index": "scenes", "query": "   "}, 400, "query: expected non-empty text"),
    ({"index": "nope", "query": "a"}, 404, "index 'nope': not served here"),
    ({"query": "a"}, 404, "several are served"),
    ({"index": "scenes", "query": "a", "k": 0}, 400, "k: Input should be greater than 0"),
    ({"index": "scenes", "query": "a", "k": -3}, 400, "k: Input should be greater than 0"),
    ({"index": "scenes", "query": "a", "k": "many"}, 400, "k: Input should be a valid integer"),
    ({"index": "scenes", "query": "a", "threshold": 2}, 400, "threshold: Input should be less than or equal to 1"),
    ({"index": "scenes"}, 400, "exactly one of 'query'"),
    ({"index": "scenes", "query": "a", "region": {"image_id": 0, "box": [0, 0, 5, 5]}}, 400, "exactly one of"),
    ({"index": "scenes", "region": {"image_id": 99, "box": [0, 0, 5, 5]}}, 400, "image_id: expected 0..7"),
    ({"index": "scenes", "region": {"image_id": 0, "box": [5, 5, 1, 1]}}, 400, "box: expected 0 <= x0 < x1"),
    ({"index": "scenes", "query": "a", "filters": {"colour": "red"}}, 400, "unknown filter 'colour'"),
    ({"index": "scenes", "query": "a", "filters": {"min_width": "big"}}, 400, "filters.min_width: expected int"),
    ({"index": "scenes", "query": "a", "extra": 1}, 400, "extra: Extra inputs are not permitted"),
    ({"index": "scenes", "query": "x" * 30_000}, 400, "query: String should have at most 20000 characters"),
])
def test_bad_requests_get_4xx_with_a_message(served, body, status, message):
    server, _ = served
    got, answer = call(server, "/api/search", body)
    assert got == status and message in answer["error"], answer


def test_malformed_json_and_bad_image_urls(served):
    server, _ = served
    status, answer = call(server, "/api/search", raw=b'{"query": "a red circle", ')
    assert status == 400 and answer["error"].startswith("body: malformed JSON")
    status, answer = call(server, "/api/search", raw=b"[1, 2]")
    assert status == 400 and "body" in answer["error"]
    assert call(server, "/api/heatmap/scenes/99?query=a")[0] == 400
    assert call(server, "/api/heatmap/scenes/0")[1]["error"].startswith("heatmap: expected ?query=")
    assert call(server, "/api/crop/scenes/0?box=1,2")[0] == 400
    assert call(server, "/api/crop/scenes/0?box=a,b,c,d")[1]["error"].startswith("box: expected comma-separated")
    assert call(server, "/api/image/nope/0")[0] == 404
    status, answer = announce_oversized_body(server)
    assert status == 413 and answer["error"].startswith("body: larger than")
    assert call(server, "/api/health")[0] == 200  # still answering


def test_a_query_longer_than_the_text_context_is_truncated_with_a_note(served):
    server, _ = served
    status, answer = call(server, "/api/search", {"index": "scenes", "query": "red circle " * 1000, "k": 2,
                                                  "threshold": 0})
    assert status == 200 and len(answer["results"]) == 2
    assert any("context of 32 tokens" in note and "cut off" in note for note in answer["notes"])
    short = call(server, "/api/search", {"index": "scenes", "query": "red circle", "k": 2, "threshold": 0})[1]
    assert not any("cut off" in note for note in short["notes"])


def test_concurrent_requests_answer_as_serial_ones(served):
    server, _ = served
    queries = ["a red circle", "blue square", "a green star", "white ring"]
    body = lambda q, name: {"index": name, "query": q, "k": 3, "threshold": 0}  # noqa: E731
    serial = {(q, n): call(server, "/api/search", body(q, n))[1]["results"] for q in queries for n in ("scenes", "scenes-2")}
    got, errors = {}, []

    def client(i):
        try:
            for j in range(4):
                q, n = queries[(i + j) % 4], ("scenes", "scenes-2")[(i + j) % 2]
                status, answer = call(server, "/api/search", body(q, n))
                assert status == 200, answer
                got.setdefault((q, n), []).append(answer["results"])
        except Exception as err:  # collected: an assert in a thread would be lost
            errors.append(err)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(len(v) for v in got.values()) == 32
    for key, answers in got.items():
        assert all(a == serial[key] for a in answers), key


@pytest.mark.slow
def test_tipslab_serve_command_starts_and_refuses_bad_arguments(served, tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    index_dir = served[1]["scenes"].index.path
    cli = [sys.executable, "-m", "tipslab.platform.cli", "serve"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    bad = subprocess.run(cli + [str(tmp_path / "nope")], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
    bad = subprocess.run(cli + [str(index_dir), "--port", "70000"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "expected a port number in 1..65535" in bad.stderr
    with socket.socket() as busy:  # a port someone else listens on
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = subprocess.run(cli + [str(index_dir), "--port", str(busy.getsockname()[1])], capture_output=True,
                               text=True, timeout=120, env=env)
    assert taken.returncode == 2 and "cannot listen there" in taken.stderr and taken.stderr.count("\n") == 1

    with socket.socket() as probe:  # a port free right now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(cli + [str(index_dir), "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.3)
        assert health == {"status": "ok", "indexes": ["scenes"]}, process.stderr.read() if process.poll() else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert b'id="search-form"' in response.read()
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=30)
    assert f"serving on http://127.0.0.1:{port}/" in out
