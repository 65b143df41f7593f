"""Search speed of the index kinds hemaclip builds, on 1,000,000 synthetic 256-d unit vectors.

The vectors are a seeded Gaussian mixture (many tight clusters, like embeddings of many similar cells),
L2-normalised, searched by inner product as `hemaclip.tasks.index` does. Measured, in one process:

* build time of each kind: flat (exact), IVF-Flat (nlist = 4 sqrt(N), k-means on a 100k sample) and
  HNSW (M = 32), the last only if a 100k-vector trial projects the full build under --hnsw-budget seconds;
* single-query latency (p50 / p99 over --latency-queries queries, one query per call);
* recall@10 of IVF and HNSW against exact flat search, for a sweep of nprobe / efSearch; the smallest
  setting reaching the 0.95 target is reported;
* a brute-force numpy baseline (matrix-vector product + argpartition) in the same process, so the
  flat/numpy ratio carries meaning on a noisy shared machine.

Writes bench/results/search_speed.json. Needs about 3 GB of memory at peak (the vectors once, one index).
"""

from __future__ import annotations

import argparse
import gc
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.io import write_json
from hemaclip.tasks.index import IndexSettings, build_faiss

RECALL_TARGET = 0.95


def mixture(n: int, dim: int, centres: np.ndarray, spread: float, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors: a random centre plus isotropic noise of `spread` per unit of centre norm, normalised."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        block = centres[rng.integers(0, len(centres), m)] + rng.standard_normal((m, dim), dtype=np.float32) * spread
        out[start : start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


LATENCY_THREADS = 1


def latencies(search_one, queries: np.ndarray) -> dict[str, float]:
    """p50 / p99 / mean milliseconds of one-query calls, with LATENCY_THREADS OpenMP threads (a server
    answers concurrent single queries, one per core; spinning OpenMP teams on a busy machine only add noise)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(LATENCY_THREADS)
    times = []
    try:
        for q in queries:
            start = time.perf_counter()
            search_one(q[None])
            times.append((time.perf_counter() - start) * 1000)
    finally:
        faiss.omp_set_num_threads(before)
    times = np.asarray(times)
    return {"p50_ms": round(float(np.percentile(times, 50)), 3), "p99_ms": round(float(np.percentile(times, 99)), 3), "mean_ms": round(float(times.mean()), 3), "queries": int(len(times))}


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="Vectors in the index.")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=2000, help="Mixture components.")
    parser.add_argument("--spread", type=float, default=0.06, help="Per-coordinate noise around each (unit-scale) centre.")
    parser.add_argument("--queries", type=int, default=1000, help="Held-out queries for recall.")
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--numpy-queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--hnsw-budget", type=float, default=420.0, help="Skip HNSW if its projected build takes longer (s).")
    parser.add_argument("--threads", type=int, default=0, help="FAISS OpenMP threads for builds and batched search (0 = library default).")
    parser.add_argument("--latency-threads", type=int, default=1, help="FAISS OpenMP threads for single-query latency.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_speed.json")
    args = parser.parse_args()

    import faiss

    global LATENCY_THREADS
    LATENCY_THREADS = args.latency_threads
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    k = args.k
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32) / np.sqrt(args.dim)
    spread = args.spread / np.sqrt(args.dim) * 4
    t0 = time.perf_counter()
    base = mixture(args.n, args.dim, centres, spread, args.seed + 1)
    queries = mixture(args.queries, args.dim, centres, spread, args.seed + 2)
    generate_s = time.perf_counter() - t0
    lat_q = queries[: args.latency_queries]
    result: dict = {
        "benchmark": "search_speed",
        "date": date.today().isoformat(),
        "machine": {**machine_info(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(), "latency_threads": args.latency_threads},
        "data": {
            "n": args.n, "dim": args.dim, "clusters": args.clusters, "spread": args.spread, "seed": args.seed,
            "queries": args.queries, "k": k, "generate_seconds": round(generate_s, 2),
            "what": "seeded Gaussian mixture, L2-normalised, inner-product search; queries drawn from the same mixture",
        },
        "recall_target": RECALL_TARGET,
    }

    # ---- exact: numpy baseline and FAISS flat ----------------------------------------------------
    def numpy_one(q: np.ndarray) -> np.ndarray:
        scores = base @ q[0]
        top = np.argpartition(-scores, k)[:k]
        return top[np.argsort(-scores[top])]

    numpy_lat = latencies(numpy_one, lat_q[: args.numpy_queries])
    t0 = time.perf_counter()
    flat, _ = build_faiss(base, "flat")
    flat_build = time.perf_counter() - t0
    flat_lat = latencies(lambda q: flat.search(q, k), lat_q)
    t0 = time.perf_counter()
    _, truth = flat.search(queries, k)
    batch_s = time.perf_counter() - t0
    agree = np.mean([set(numpy_one(q[None])) == set(t) for q, t in zip(queries[:20], truth[:20])])
    result["numpy_bruteforce"] = numpy_lat
    result["flat"] = {
        "build_seconds": round(flat_build, 3), **flat_lat,
        "batched_queries_per_s": round(args.queries / batch_s, 1),
        "numpy_over_flat_p50_ratio": round(numpy_lat["p50_ms"] / flat_lat["p50_ms"], 2),
        "top10_equal_to_numpy_fraction": float(agree),
    }
    print("flat", result["flat"], flush=True)
    del flat
    gc.collect()

    # ---- IVF ----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ivf, meta = build_faiss(base, "ivf", IndexSettings(nprobe=1, seed=args.seed))
    ivf_build = time.perf_counter() - t0
    sweep = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
        ivf.nprobe = nprobe
        _, found = ivf.search(queries, k)
        entry = {"nprobe": nprobe, "recall_at_10": round(recall_at(found, truth, k), 4), **latencies(lambda q: ivf.search(q, k), lat_q)}
        entry["speedup_vs_flat_p50"] = round(flat_lat["p50_ms"] / entry["p50_ms"], 2)
        sweep.append(entry)
        print("ivf", entry, flush=True)
    chosen = next((e for e in sweep if e["recall_at_10"] >= RECALL_TARGET), None)
    result["ivf"] = {"build_seconds": round(ivf_build, 2), "nlist": meta["nlist"], "train_sample": IndexSettings().train_sample, "sweep": sweep, "chosen": chosen}
    del ivf
    gc.collect()

    # ---- HNSW (only if it fits the budget) ----------------------------------------------------------
    settings = IndexSettings()
    trial_n = min(100_000, args.n)
    t0 = time.perf_counter()
    trial, _ = build_faiss(base[:trial_n], "hnsw", settings)
    trial_s = time.perf_counter() - t0
    del trial
    projected = trial_s * (args.n / trial_n) * np.log(args.n) / np.log(trial_n)
    hnsw: dict = {"M": settings.hnsw_m, "ef_construction": settings.ef_construction, "trial_vectors": trial_n,
                  "trial_build_seconds": round(trial_s, 2), "projected_build_seconds": round(float(projected), 1)}
    if projected > args.hnsw_budget:
        hnsw["skipped"] = f"projected build {projected:.0f} s exceeds the budget of {args.hnsw_budget:.0f} s"
    else:
        t0 = time.perf_counter()
        index, _ = build_faiss(base, "hnsw", settings)
        hnsw["build_seconds"] = round(time.perf_counter() - t0, 2)
        sweep = []
        for ef in (16, 32, 64, 128, 256):
            index.hnsw.efSearch = ef
            _, found = index.search(queries, k)
            entry = {"ef_search": ef, "recall_at_10": round(recall_at(found, truth, k), 4), **latencies(lambda q: index.search(q, k), lat_q)}
            entry["speedup_vs_flat_p50"] = round(flat_lat["p50_ms"] / entry["p50_ms"], 2)
            sweep.append(entry)
            print("hnsw", entry, flush=True)
        hnsw["sweep"] = sweep
        hnsw["chosen"] = next((e for e in sweep if e["recall_at_10"] >= RECALL_TARGET), None)
        del index
    result["hnsw"] = hnsw
    print("hnsw", {k2: v for k2, v in hnsw.items() if k2 != "sweep"}, flush=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
