"""The ``ptq`` command: quantize, report, compile, tune, demo, bench, profile, fuzz, zoo and
observer-zoo."""

from __future__ import annotations

import argparse
import collections
import json
import sys


from ptqpasses_tools.inputs import UsageError, calibration_batches, example_inputs, load_model


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="package.module:attr naming an nn.Module or a factory of one")
    p.add_argument("--input", action="append", default=[], metavar="SHAPE:DTYPE",
                   help="an input's shape and dtype, e.g. 1x3x224x224:float32 (repeat per input)")
    p.add_argument("--config", metavar="JSON",
                   help="QuantConfig as JSON (ptqpasses.QuantConfig.to_dict()), or @file.json")


def _add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", required=True, metavar="SOURCE",
                   help="a .npy / .pt file of samples shaped [N, *input shape without the "
                        "batch dim] (numpy.save('x.npy', x)), a folder of such files or of "
                        "images, or module:function returning batches")
    p.add_argument("--batch-size", type=int, default=8)


def _config(text):
    import ptqpasses
    if not text:
        return ptqpasses.QuantConfig()
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    try:
        return ptqpasses.QuantConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError) as e:
        raise UsageError(f"--config is not a valid QuantConfig JSON: {e}") from None


def _calibrated(args, guard: bool = False):
    """(model, inputs, data, config, observed): ``observed`` prepared and calibrated; with
    ``guard``, on the accuracy guard's plan and on the batches it calibrated with."""
    import ptqpasses
    model = load_model(args.model)
    inputs = example_inputs(args.input)
    data = calibration_batches(args.calib, tuple(inputs[0].shape), args.batch_size)
    config = _config(args.config)
    if guard:
        q = ptqpasses.quantize(model, inputs, data, config, progress=False)
        rep = q.meta[ptqpasses.guard.GUARD_KEY]
        config, data = rep.config, data[:rep.calibrated]
    observed = ptqpasses.prepare(model, inputs, config)
    ptqpasses.calibrate(observed, data)
    return model, inputs, data, config, observed


def cmd_quantize(args) -> int:
    import os
    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1:  # this process starts the ranks; each runs _quantize_rank
        from ptqpasses.distributed import launch
        inputs = example_inputs(args.input)  # usage errors here, not in N tracebacks
        calibration_batches(args.calib, tuple(inputs[0].shape), args.batch_size)
        _config(args.config)
        launch(_quantize_rank, args.nproc, (args,))
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # a rank torchrun started
        import torch.distributed as dist
        started = not dist.is_initialized()
        if started:
            dist.init_process_group("gloo")
        try:
            _quantize_rank(args)
        finally:
            if started:
                dist.destroy_process_group()
        return 0
    model, inputs, data, config, observed = _calibrated(args, guard=not args.no_guard)
    _write_recipe(args, config, observed)
    return 0


def _quantize_rank(args) -> None:
    """One rank of ``ptq quantize --nproc N`` (or of ``torchrun ... -m tools.cli quantize``):
    calibrates on batches ``rank, rank + N, ...`` (a DistributedSampler's interleaving, not
    padded), merged across the ranks; rank 0 writes the recipe. No accuracy guard: it
    calibrates and judges in one process."""
    import zlib

    import torch
    import torch.distributed as dist

    import ptqpasses
    from ptqpasses.capture import WEIGHTS_KEY
    rank, world = dist.get_rank(), dist.get_world_size()
    model = load_model(args.model)
    inputs = example_inputs(args.input)
    data = calibration_batches(args.calib, tuple(inputs[0].shape), args.batch_size)
    config = _config(args.config)
    observed = ptqpasses.prepare(model, inputs, config)
    digest = torch.tensor([zlib.crc32(observed.meta[WEIGHTS_KEY].encode())], dtype=torch.int64)
    digests = [torch.zeros_like(digest) for _ in range(world)]
    dist.all_gather(digests, digest)
    if len({int(d) for d in digests}) > 1:
        raise UsageError(f"{args.model} has other weights on other ranks (a factory that "
                         "initializes at random without a seed?): load a checkpoint")
    ptqpasses.calibrate(observed, data[rank::world], progress=rank == 0)
    if rank == 0:
        print(f"calibrated on {len(data)} batches in {world} processes (rank r: batches r, "
              f"r + {world}, ...), without the accuracy guard")
        _write_recipe(args, config, observed)


def _write_recipe(args, config, observed) -> None:
    import ptqpasses
    path = ptqpasses.save_recipe(observed, args.out, pipeline=ptqpasses.prepare_pipeline(config))
    q = ptqpasses.convert(observed)
    cov = ptqpasses.coverage(q)
    print(f"wrote recipe {path} (+ .safetensors); {sum(c.integer for c in cov)}/{len(cov)} "
          "compute nodes are integer ops")
    for c in cov:
        if not c.integer:
            at = f" at {c.where}" if c.where else ""
            print(f"  float: {c.node} ({c.op}){at}: {c.reason}")


def cmd_report(args) -> int:
    import ptqpasses
    model, inputs, data, config, observed = _calibrated(args)
    q = ptqpasses.convert(observed)
    print(ptqpasses.report(q, model, data[: args.batches]).to_markdown())
    return 0


def _recipe_graph(args):
    """Checks --target, then replays --recipe on the model: (integer graph, example inputs)."""
    import ptqpasses
    from ptqpasses_backends import tvm as tvm_backend
    try:
        tvm_backend.resolve(args.target)
    except ValueError as e:
        raise UsageError(str(e)) from None
    inputs = example_inputs(args.input)
    return ptqpasses.apply_recipe(load_model(args.model), inputs, args.recipe), inputs


def cmd_compile(args) -> int:
    from ptqpasses_backends import tvm as tvm_backend
    q, inputs = _recipe_graph(args)
    if args.database:  # tuned records are per static shape: compile for the --input shapes
        compiled = tvm_backend.compile(q, target=args.target, database=args.database,
                                       example_inputs=inputs)
    else:
        compiled = tvm_backend.compile(q, target=args.target)
    out = compiled.save(args.out)
    print(f"compiled for {args.target}: {out}")
    print(f"strategy: {compiled.meta['strategy_why']}")
    variants = compiled.meta.get("variants") or {}
    if variants:  # e.g. AVX2: the vpmaddubsw kernels, and why the others are not
        counts = collections.Counter(v for v, _ in variants.values())
        print("packed kernels: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
        for node, (variant, why) in variants.items():
            if variant == "main":
                print(f"  {node}: {why}")
    return 0


def cmd_tune(args) -> int:
    from ptqpasses_backends import tvm as tvm_backend
    if args.rpc:
        from ptqpasses_backends.tvm.remote import RpcDevice
        try:
            RpcDevice.parse(args.rpc)
        except ValueError as e:
            raise UsageError(f"--rpc: {e}") from None
    q, inputs = _recipe_graph(args)
    result = tvm_backend.tune(q, target=args.target, trials=args.trials, database=args.database,
                              example_inputs=inputs, kinds=tuple(args.kinds), rpc=args.rpc)
    print(f"tuning database: {result.database}")
    print("| kernel | kind | new trials | seconds | best (ms) |\n|---|---|---:|---:|---:|")
    for t in result.tasks:
        best = "" if t.best_ms is None else f"{t.best_ms:.3f}"
        print(f"| {t.name} | {t.kind} | {t.trials} | {t.seconds:.1f} | {best} |")
    print(f"{result.trials} new trials; a second run of the same model tunes nothing")
    return 0


def cmd_demo(args) -> int:
    from ptqpasses_tools.demo import run_demo
    return run_demo(quick=args.quick, threads=args.threads)


def cmd_bench(args) -> int:
    from ptqpasses_tools.bench import run_bench
    return run_bench(args)


def cmd_fuzz(args) -> int:
    try:
        from ptqpasses_tools.fuzz import run
    except ImportError as e:  # hypothesis comes with the test extra
        raise UsageError(f"ptq fuzz needs hypothesis ({e}): pip install -e '.[test]'") from None
    return run(args)


def cmd_zoo(args) -> int:
    from ptqpasses_tools.zoo import run
    return run(args)


def cmd_profile(args) -> int:
    from ptqpasses_tools.profile import run
    return run(args)


EXAMPLES = {
    "quantize": "ptq quantize tools.digits:DigitsCNN --input 1x1x8x8:float32 --calib x.npy --out recipe",
    "report": "ptq report tools.digits:DigitsCNN --input 1x1x8x8:float32 --calib x.npy",
    "compile": ("ptq compile tools.digits:DigitsCNN --input 1x1x8x8:float32 --recipe recipe "
                "--target host --out model.so"),
    "tune": ("ptq tune tools.digits:DigitsCNN --input 1x1x8x8:float32 --recipe recipe "
             "--trials 16 --database ./tuning"),
    "demo": "ptq demo",
    "bench": ("ptq bench --models resnet18 minilm --peers eager compile ort-int8 tvm-int8 "
              "--runs 30 --threads 1 2 --out bench-out"),
    "profile": "ptq profile --model minilm --config recipe --json minilm-profile.json",
    "fuzz": "ptq fuzz --graphs 2000 --budget 5400 --seed 0 --out fuzz.json",
    "zoo": "ptq zoo --models bert,gpt2,vit,resnet --peers pt2e ort --out zoo-out",
    "observer-zoo": "ptq observer-zoo --out docs/accuracy",
}


def cmd_observer_zoo(args) -> int:
    from ptqpasses_tools.observer_zoo import run_cli
    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptq", description="Post-training int8 quantization of PyTorch models, "
        "compiled with Apache TVM.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(f"  {e}" for e in EXAMPLES.values()))
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_, fn):
        p = sub.add_parser(name, help=help_, description=help_,
                           epilog=f"example:\n  {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(fn=fn)
        return p

    p = add("quantize", "calibrate a model and save its quantization recipe", cmd_quantize)
    _add_model_args(p), _add_calib_args(p)
    p.add_argument("--out", required=True, help="recipe base path (writes .json and .safetensors)")
    p.add_argument("--no-guard", action="store_true",
                   help="calibrate on every batch, no accuracy guard (by default the last "
                        "quarter of the batches judges the result; see ptqpasses.guard)")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="calibrate in N local processes (torch.distributed, gloo), each on "
                        "every Nth batch, statistics merged: the qparams of one process on "
                        "all batches (see README, Distributed calibration); no accuracy guard")
    p = add("report", "per-node SQNR and float coverage of the quantized model", cmd_report)
    _add_model_args(p), _add_calib_args(p)
    p.add_argument("--batches", type=int, default=4, help="batches used for the SQNR")
    p = add("compile", "apply a recipe and compile the integer graph with TVM", cmd_compile)
    _add_model_args(p)
    p.add_argument("--recipe", required=True, help="recipe from `ptq quantize`")
    p.add_argument("--target", default="host",
                   help="named target (see ptqpasses_backends.tvm.targets)")
    p.add_argument("--out", required=True, help="output .so (metadata JSON written beside it)")
    p.add_argument("--database", help="tuning database from `ptq tune` (compiles for the "
                   "--input shapes)")
    p = add("tune", "tune the model's int8 kernels with MetaSchedule into a reusable database",
            cmd_tune)
    _add_model_args(p)
    p.add_argument("--recipe", required=True, help="recipe from `ptq quantize`")
    p.add_argument("--target", default="host", help="named target that runs on this machine "
                   "(or on the --rpc devices)")
    p.add_argument("--rpc", metavar="HOST:PORT:KEY",
                   help="measure on the devices a TVM RPC tracker lists under KEY (built and "
                        "linked here; records stay in the local database)")
    p.add_argument("--trials", type=int, default=32,
                   help="measured candidates per kernel (~1 s each on one core)")
    p.add_argument("--database", help="database root (default $PTQ_TVM_TUNING_DB or "
                   "~/.cache/ptqpasses/tvm-tuning)")
    p.add_argument("--kinds", nargs="+", default=["dense", "conv2d"],
                   help="kernel kinds to tune (dense, conv2d)")
    p = add("demo", "train a digits CNN, quantize, compile for this CPU, compare with PyTorch",
            cmd_demo)
    p.add_argument("--quick", action="store_true", help="fewer epochs and timing runs")
    p.add_argument("--threads", type=int, default=1, help="threads for both TVM and torch")
    p = add("bench", "whole-model latency and accuracy of ptqpasses' TVM builds against "
            "PyTorch and ONNX Runtime peers (markdown, JSON and PNG)", cmd_bench)
    from ptqpasses_tools.bench import add_arguments as add_bench_arguments
    add_bench_arguments(p)
    p = add("profile", "where a compiled bench model's time goes: every kernel call timed "
            "alone, grouped by kind", cmd_profile)
    from ptqpasses_tools.profile import add_arguments as add_profile_arguments
    add_profile_arguments(p)
    p = add("fuzz", "random small models: quantize, compile for the targets that run here, "
            "outputs bit-exact against the torch integer graph (failures shrunk)", cmd_fuzz)
    try:
        from ptqpasses_tools.fuzz import add_arguments as add_fuzz_arguments
    except ImportError:  # without hypothesis, cmd_fuzz says what to install
        add_fuzz_arguments = None
    if add_fuzz_arguments is not None:
        add_fuzz_arguments(p)
    p = add("zoo", "transformers architectures (small random-init configs) and our own models: "
            "quantize, coverage, compile, a new batch against the torch integer graph, SQNR",
            cmd_zoo)
    from ptqpasses_tools.zoo import add_arguments as add_zoo_arguments
    add_zoo_arguments(p)
    p = add("observer-zoo", "real-weight models from PyPI wheels with held-out real inputs: "
            "the default flow with each activation observer, and the static peers (markdown "
            "and JSON)", cmd_observer_zoo)
    from ptqpasses_tools.observer_zoo import add_arguments as add_observer_zoo_arguments
    add_observer_zoo_arguments(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except UsageError as e:
        print(f"ptq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a library error: say which and where, without a traceback wall
        from ptqpasses import CalibrationError, CaptureError, ConfigError, PassError, RecipeError
        known = (CalibrationError, CaptureError, ConfigError, PassError, RecipeError)
        if "ptqpasses_backends.tvm" in sys.modules:
            from ptqpasses_backends.tvm import EmitError, LoadError
            known += (EmitError, LoadError)
        if isinstance(e, ConnectionError):  # (an RPC tracker or device out of reach)
            known += (ConnectionError,)
        if isinstance(e, known):
            print(f"ptq {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
