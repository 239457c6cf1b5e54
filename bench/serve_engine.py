"""The serving engine without HTTP: ``cora.inference.InferenceEngine`` on a CoRa checkpoint against the float model.

    python bench/serve_engine.py                       # GPU: CUDA graphs, buckets 1..64
    python bench/serve_engine.py --device cpu --max-batch 8 --min-time 0.3     # no graphs; a quick CPU check
    python bench/serve_engine.py --checkpoint r20_w4.safetensors [--float cifar_resnet20] [--time-cap 60]
                                 [--out bench/results/serve_engine_<gpu|cpu>.csv]

What ``cora serve`` runs behind its batcher, measured alone. For each model (the CoRa checkpoint, made
on the fly by ``bench/serve_load.py``'s fast conversion of cifar_resnet20 unless ``--checkpoint`` or
``--accurate``; then ``--float``): build the engine (load + deploy, with ``--deploy-weights``: auto is
dense weights on the CPU, packed codes on CUDA; the ``weights`` column), time ``warm_up()`` (on CUDA the
kernel autotuning plus one CUDA-graph capture per bucket; on the CPU one forward per bucket), then
for every bucket (1, 2, 4, ... ``--max-batch``) time ``predict`` on a full batch of preprocessed
CIFAR-10 test images (float32 on the CPU, as the server hands them over: the host-to-device copy,
the graph replay, the copy back, softmax and top-k are all inside): latency median / p10 / p90 over
at least ``--min-time`` seconds and ``--min-calls`` calls, images/s. A top-1 accuracy over
``--eval-images`` test images through ``predict`` checks that the served model is the right one.

Rows go to ``--out`` (default ``bench/results/serve_engine_<gpu|cpu>.csv``, replaced) with the device
name, versions and commit; a summary with the CoRa / float ratios per bucket is printed last.
``--time-cap``: no new bucket is started after that many seconds (rows so far are kept).
"""
from __future__ import annotations

import argparse
import os  # torch is imported where it is used: --help stays fast
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import ROOT, git_commit, machine, versions, write_csv  # noqa: E402
from serve_load import make_checkpoint, percentile  # noqa: E402

clock = time.perf_counter


def build_engine(kind: str, source: str, args):
    """The engine for ``kind`` ("cora": a checkpoint path; "float": a model name) and its build seconds."""
    from cora.inference import InferenceEngine

    t0 = clock()
    kw = dict(device=args.device, dtype=args.dtype, max_batch=args.max_batch)
    if kind == "cora":
        engine = InferenceEngine.from_checkpoint(source, deploy_weights=args.deploy_weights, **kw)
    else:
        engine = InferenceEngine.from_float(source, shared=args.shared, **kw)
    return engine, clock() - t0


def time_predict(engine, x, min_time: float, min_calls: int) -> list:
    """Seconds per ``engine.predict(x)`` call: two untimed calls, then at least ``min_calls`` calls and
    ``min_time`` seconds (predict returns Python lists, so every call has finished when it returns)."""
    for _ in range(2):
        engine.predict(x)
    times, start = [], clock()
    while len(times) < min_calls or clock() - start < min_time:
        t0 = clock()
        engine.predict(x)
        times.append(clock() - t0)
    return times


def top1(engine, images, labels) -> float:
    """Top-1 accuracy (%) of ``engine.predict`` over ``images``, in batches of the largest bucket."""
    correct = 0
    for i in range(0, images.shape[0], engine.max_batch):
        preds = engine.predict(images[i:i + engine.max_batch], top_k=1)
        correct += sum(p[0][0] == int(y) for p, y in zip(preds, labels[i:i + engine.max_batch]))
    return 100.0 * correct / max(1, images.shape[0])


def bench_model(kind: str, source: str, images, labels, args, meta: dict, over) -> list:
    """Warm-up and every bucket of one model: its CSV rows."""
    import torch

    if over():
        print(f"# time cap reached: {kind} not measured")
        return []
    engine, build_s = build_engine(kind, source, args)
    warm_s = engine.warm_up()
    acc = top1(engine, images[:args.eval_images], labels[:args.eval_images])
    print(f"# {kind}: built in {build_s:.1f}s, warm-up {warm_s:.1f}s ({'CUDA graphs' if engine._graphs else 'no graphs'},"
          f" weights {engine.info()['weights']},"
          f" buckets {engine.buckets}), top-1 {acc:.2f}% on {min(args.eval_images, images.shape[0])} test images",
          flush=True)
    rows = []
    for b in engine.buckets:
        if over():
            print(f"# time cap reached: {kind} stops before bucket {b}")
            break
        times = [t * 1e3 for t in time_predict(engine, images[:b], args.min_time, args.min_calls)]
        med = statistics.median(times)
        rows.append(dict(model=kind, source=os.path.basename(str(source)), weights=engine.info()["weights"] or "",
                         bucket=b, calls=len(times), median_ms=round(med, 4),
                         p10_ms=round(percentile(times, 10), 4), p90_ms=round(percentile(times, 90), 4),
                         images_per_s=round(b / (med * 1e-3), 1), warmup_s=round(warm_s, 2), build_s=round(build_s, 2),
                         cuda_graphs=bool(engine._graphs), dtype=str(engine.dtype).replace("torch.", ""),
                         top1=round(acc, 2), eval_images=min(args.eval_images, images.shape[0]), **meta))
        print(f"  {kind:<6}{b:>5}{med:>10.3f} ms{rows[-1]['images_per_s']:>12.0f} img/s", flush=True)
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def summary(rows: list) -> str:
    """Markdown: per bucket, CoRa and float median latency, images/s and the CoRa / float ratios."""
    by = {(r["model"], r["bucket"]): r for r in rows}
    out = ["| bucket | CoRa ms | float ms | CoRa img/s | float img/s | latency CoRa/float |", "|---|---|---|---|---|---|"]
    for (model, b), c in by.items():
        f = by.get(("float", b))
        if model == "cora" and f:
            out.append(f"| {b} | {c['median_ms']:.3f} | {f['median_ms']:.3f} | {c['images_per_s']:.0f} | "
                       f"{f['images_per_s']:.0f} | {c['median_ms'] / f['median_ms']:.2f} |")
    warm = {r["model"]: r["warmup_s"] for r in rows}
    return "\n".join(out) + "\nwarm-up s: " + ", ".join(f"{k} {v}" for k, v in warm.items())


def run_meta(device) -> dict:
    """Device name, machine, versions and commit: the same in every row."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    v = versions("torch", "triton")
    return dict(device=name, machine=machine(), torch=v["torch"], triton=v["triton"], commit=git_commit(),
                threads=torch.get_num_threads(), run=time.strftime("%Y-%m-%dT%H:%M:%S"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="the CoRa checkpoint (default: a fast conversion made now)")
    ap.add_argument("--accurate", action="store_true", help="convert with the default recipe instead of RTN")
    ap.add_argument("--float", dest="float_model", default="cifar_resnet20")
    ap.add_argument("--device", default="auto", help="auto|cuda|cpu")
    ap.add_argument("--dtype", default=None, help="float16|bfloat16|float32 (default: fp16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--deploy-weights", default="auto", choices=("auto", "dense", "packed"),
                    help="the checkpoint's deployed weights (default auto: dense on the CPU, packed on CUDA)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timed calls per bucket (at least)")
    ap.add_argument("--min-calls", type=int, default=20)
    ap.add_argument("--eval-images", type=int, default=1000)
    ap.add_argument("--time-cap", type=float, default=None, help="start no new bucket after this many seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--shared", default=None, help="shared folder (default: CORA_SHARED or ../shared)")
    ap.add_argument("--out", default=None, help="CSV path (default bench/results/serve_engine_<gpu|cpu>.csv)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from cora.experiments.data import cifar10_test

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    args.device = str(device)
    t0 = clock()
    meta = run_meta(device)
    print(f"# {meta}")
    test = cifar10_test(shared=args.shared)
    images, labels = test.images[:max(args.eval_images, args.max_batch)], test.labels
    rows = []
    with tempfile.TemporaryDirectory(prefix="serve_engine_") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint, secs = make_checkpoint(tmp, args.accurate, args.shared)
            print(f"# converted cifar_resnet20 ({'default recipe' if args.accurate else 'fast RTN'}) in {secs:.1f}s")
        for kind, source in (("cora", checkpoint), ("float", args.float_model)):
            rows += bench_model(kind, source, images, labels, args, meta,
                                lambda: args.time_cap is not None and clock() - t0 > args.time_cap)
    out = args.out or str(ROOT / "bench" / "results" / f"serve_engine_{'gpu' if device.type == 'cuda' else 'cpu'}.csv")
    write_csv(rows, out)
    print("\n" + summary(rows))
    print(f"# {len(rows)} rows written to {out} ({clock() - t0:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
