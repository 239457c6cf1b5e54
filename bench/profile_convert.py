"""Where the time of ``cora quantize`` goes: wall and CPU seconds per phase, and the top functions.

    PYTHONPATH=. python bench/profile_convert.py cifar_resnet20 --bits 4 --threads 1
    PYTHONPATH=. python bench/profile_convert.py cifar_resnet56 --bits 4 --weights random --eval-limit 500

Runs what the command line runs (:func:`cora.experiments.pipeline.quantize_and_evaluate`: load, the
float and RTN evaluations, the conversion, the evaluation of the result) with every phase of
``convert`` and every evaluation timed (wall and process CPU time), and, with ``--top N``, the N
functions with the most time of their own under ``cProfile`` (torch's operators show up as the
Python-visible calls that run them). ``--weights random`` converts the architecture with its random
initial weights (ResNet-44 / 56 have no pretrained checkpoint here): timings only, the accuracies
are meaningless. ``--labels`` / ``--no-labels`` picks the labelled or the label-free default.
The load average is printed next to the numbers: the machine is shared.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cora import CoRaConfig  # noqa: E402
from cora import convert as convert_module  # noqa: E402,F401  (the package exposes the function; the module below)
from cora.experiments import pipeline  # noqa: E402

_convert = sys.modules["cora.convert"]
PHASES = ("choose_layer_widths", "quantize_base", "choose_ranks", "build_layers", "tune_layers")


class PhaseClock:
    """Accumulates wall and process CPU seconds per named phase (a phase may run several times)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c

    def wrap(self, owner, attr: str, name: str | None = None) -> None:
        """Replace ``owner.attr`` by a timed call of itself."""
        fn = getattr(owner, attr)
        clock = self

        def timed(*args, **kwargs):
            with clock.timed(name or attr):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def _instrument(clock: PhaseClock) -> None:
    for phase in PHASES:
        clock.wrap(_convert, phase)
    # the float logits the KL losses need are computed lazily inside a phase; the evaluations and the
    # loading are the pipeline's
    from cora.experiments import data as data_module

    evaluate = data_module.evaluate

    def timed_evaluate(*args, **kwargs):
        with clock.timed("evaluate"):
            return evaluate(*args, **kwargs)

    data_module.evaluate = timed_evaluate
    clock.wrap(pipeline, "load_float_model", "load")
    clock.wrap(pipeline, "calibration_data", "load")
    clock.wrap(pipeline, "evaluation_data", "load")


def _random_weights(name: str):
    from cora.experiments.models import build_model

    model = build_model(name, weights=False)
    model.cora_architecture = {"name": name}
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="cifar_resnet20, cifar_resnet56, ...")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--weights", default=None, help="'random': the architecture's initial weights (timing only)")
    p.add_argument("--no-labels", action="store_true", help="the label-free default (uniform ranks)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--eval-limit", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="search iterations (default: the config's)")
    p.add_argument("--tune-iters", type=int, default=None, help="tuning iterations (default: the config's)")
    p.add_argument("--no-rtn", action="store_true")
    p.add_argument("--top", type=int, default=0, help="print the N functions with the most own time (cProfile)")
    p.add_argument("--json", default=None, help="append one JSON line with the numbers to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = PhaseClock()
    _instrument(clock)
    if args.weights == "random":
        pipeline.load_float_model = lambda name, weights=None, shared=None: _random_weights(name)
    counts = {k: v for k, v in (("iterations", args.iters), ("tune_iterations", args.tune_iters)) if v is not None}
    config = CoRaConfig(bits=args.bits, **counts)
    profiler = cProfile.Profile() if args.top else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    _, res = pipeline.quantize_and_evaluate(
        args.model, config, eval_limit=args.eval_limit, with_rtn=not args.no_rtn, labels=not args.no_labels,
    )
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load = os.getloadavg()
    print(f"# {args.model} W{args.bits} {'label-free' if args.no_labels else 'labelled'}, threads {torch.get_num_threads()}, "
          f"weights {args.weights or 'pretrained'}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"# acc {res['acc']:.2f} (float {res.get('float_acc', float('nan')):.2f}, rtn {res.get('rtn_acc', float('nan')):.2f}), "
          f"{res['eval_images']} {res['eval_split']} images, fraction {res['adapter_fraction']:.4f}, "
          f"equiv bits {res['equiv_bits']:.3f}")
    print(f"{'phase':<22} {'wall s':>8} {'cpu s':>8}")
    for name in clock.wall:
        print(f"{name:<22} {clock.wall[name]:8.1f} {clock.cpu[name]:8.1f}")
    print(f"{'total':<22} {wall:8.1f} {cpu:8.1f}")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-6000:])
    if args.json:
        row = dict(model=args.model, bits=args.bits, labels=not args.no_labels, threads=torch.get_num_threads(),
                   weights=args.weights or "pretrained", load=load[0], wall=wall, cpu=cpu, acc=res["acc"],
                   phases_wall=clock.wall, phases_cpu=clock.cpu, eval_images=res["eval_images"], **counts)
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
