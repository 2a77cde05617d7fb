"""Load check of `tipslab serve`: N concurrent clients on loopback for a bounded time.

Each client sends search requests back to back: text queries (each one new, so the service's
query cache never answers and every one runs the text tower), every fourth a region query, every
tenth a bad request that must get a 4xx. The table gives requests/s (all kinds), p50 / p95 / max
latency of the text queries, p50 of the region queries, and errors (a 5xx, a dropped connection,
or a status other than the one due). The baseline, measured in the same run, is the same text
search called in-process by one thread without HTTP; ratios are against its p50. Never asserted
in tests.

    python bench/bench_serve.py                         # a tiny untrained model over 64 scenes
    python bench/bench_serve.py --index runs/index --clients 1,4,16 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

QUERIES = ["a red circle", "a blue square", "a green star", "white ring", "an orange cross", "purple diamond",
           "a dog on a beach", "yellow triangle"]


def tiny_index(root: Path) -> Path:
    import torch

    from tipslab.modules.checkpoint import save_checkpoint
    from tipslab.modules.encoder import build_encoder
    from tipslab.retrieval.index_dir import build_index

    cfg = {"vision": {"size": "tiny", "img_size": 112, "drop_path_rate": 0.0},
           "text": {"size": "tiny", "vocab_size": 49408, "context_length": 32},
           "tokenizer": {"kind": "bpe", "path": None, "context_length": 32}, "temperature": 0.07}
    torch.manual_seed(0)
    model = save_checkpoint(build_encoder(cfg), cfg, root / "model")
    build_index(model, "scenes:val:64", root / "index", progress=False)
    return root / "index"


def post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def client(url: str, seed: int, stop: float, latencies: list, regions: list, errors: list, counts: list) -> None:
    rng = np.random.default_rng(seed)
    i = 0
    while time.perf_counter() < stop:
        i += 1
        if i % 10 == 0:
            body, want = {"query": "", "k": 5}, 400
        elif i % 4 == 0:
            body, want = {"region": {"image_id": int(rng.integers(0, 64)), "box": [28, 28, 70, 70]}, "k": 10}, 200
        else:
            body, want = {"query": f"{QUERIES[int(rng.integers(0, len(QUERIES)))]} {seed}-{i}", "k": 10}, 200
        started = time.perf_counter()
        try:
            status = post(url + "/api/search", body)
        except OSError as err:  # refused / reset: the service failed to answer
            errors.append(repr(err))
            continue
        took = time.perf_counter() - started
        counts.append(1)
        if status != want:
            errors.append(f"{body} -> {status}")
        elif "region" in body:
            regions.append(took)
        elif want == 200:
            latencies.append(took)


def in_process_baseline(indexes: dict, seconds: float) -> list[float]:
    from tipslab.retrieval.service import run_search

    served = next(iter(indexes.values()))
    latencies, stop, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < stop:
        started = time.perf_counter()
        run_search(served, {"query": f"{QUERIES[i % len(QUERIES)]} base-{i}", "k": 10})
        latencies.append(time.perf_counter() - started)
        i += 1
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="index directory (default: build a tiny one)")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each load level")
    args = parser.parse_args()

    from tipslab.retrieval.service import load_indexes
    from tipslab.retrieval.service_app import ServerThread

    with tempfile.TemporaryDirectory() as tmp:
        index = args.index or tiny_index(Path(tmp))
        indexes = load_indexes([index])
        base = in_process_baseline(indexes, args.seconds)
        base_p50 = float(np.percentile(base, 50)) * 1000
        rows = [("in-process, 1 thread", 1, len(base), len(base) / args.seconds, base_p50,
                 float(np.percentile(base, 95)) * 1000, max(base) * 1000, float("nan"), 0)]
        with ServerThread(indexes) as server:
            for n in (int(c) for c in args.clients.split(",")):
                latencies, regions, errors, counts = [], [], [], []
                stop = time.perf_counter() + args.seconds
                threads = [threading.Thread(target=client,
                                            args=(server.url, s, stop, latencies, regions, errors, counts))
                           for s in range(n)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                lat = np.asarray(latencies or [float("nan")]) * 1000
                region_p50 = float(np.percentile(np.asarray(regions or [float("nan")]) * 1000, 50))
                rows.append((f"HTTP, {n} client(s)", n, len(counts), len(counts) / args.seconds,
                             float(np.percentile(lat, 50)), float(np.percentile(lat, 95)), float(lat.max()),
                             region_p50, len(errors)))
                for error in errors[:3]:
                    print(f"  error: {error}")
    print(f"\nindex {index}: {indexes[next(iter(indexes))].index.num_images} images, {args.seconds:g} s per level")
    print(f"{'mode':24s} {'clients':>7s} {'requests':>8s} {'req/s':>7s} {'text p50':>9s} {'text p95':>9s} "
          f"{'text max':>9s} {'region p50':>10s} {'errors':>6s} {'p50/base':>8s}   (ms)")
    for mode, n, total, rate, p50, p95, top, region, errs in rows:
        print(f"{mode:24s} {n:7d} {total:8d} {rate:7.1f} {p50:9.1f} {p95:9.1f} {top:9.1f} {region:10.1f} {errs:6d} "
              f"{p50 / base_p50:8.2f}")


if __name__ == "__main__":
    main()
