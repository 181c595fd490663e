"""Benchmark suite: fastce's shifted cross-entropy against the losses people use today.

One command runs everything that is installed, on whatever device is there::

    python benchmarks/bench_cross_entropy.py            # full suite (GPU: standard shapes + sweeps for the plots)
    python benchmarks/bench_cross_entropy.py --quick    # standard shapes only, fewer reps, no sweeps

What is measured, per (implementation, mode, shape), from unshifted ``[B, T, V]`` logits requiring grad (bf16 on a
GPU, float32 on the CPU; random normal x 2), ~20% padding (labels = -100 at the right end of rows of random lengths)
and ``num_items_in_batch`` passed as a device tensor, as transformers' Trainer does:

* ``fwd+bwd``: loss + ``backward()``; ``fwd+bwd-inplace``: the same with ``inplace_backward=True``; ``fwd``: loss
  under ``torch.no_grad()``. Before every rep, outside the timed region, the logits are made afresh from a pristine
  leaf by ``_GradSink``, which stands in for the LM head: its backward receives the gradient and keeps it (for the
  error check, and so that it counts in the peak memory) as the head's matmul would consume it. A plain leaf would
  misreport the in-place mode: ``AccumulateGrad`` copies a gradient that aliases the leaf before storing it in
  ``.grad``. ``--leaf-grad`` measures that way instead (the logits restored by ``copy_`` before each rep).
* median time over reps, each rep timed alone with CUDA events, L2 flushed before it (like ``triton.testing.do_bench``);
* effective bandwidth: ``B*T*V*elem_size`` bytes (fwd) or twice that (fwd+bwd: read the logits, write the gradient)
  over the median time, and its fraction of the device's measured copy bandwidth;
* peak extra memory: ``max_memory_allocated`` during one call minus what was allocated before it (logits and
  labels already there, the gradient counted as extra);
* errors against the float64 reference ``fastce.reference.causal_lm_loss_reference``, computed once per shape in
  row chunks: relative error of the loss, max-abs and relative-L2 error of the gradient.

Implementations: fastce for each backend of ``fastce.available_backends()`` (default and in-place), transformers'
eager ``ForCausalLMLoss``, ``F.cross_entropy`` on the shifted float32 copy (the obvious user code), ``torch.compile``
of ``ForCausalLMLoss`` (GPU only unless named in ``--impls``), and Liger / QuACK when importable (they need the
shifted contiguous copy, which is included in their time).

Outputs (at most 6 files, all in ``--out``, named after the device): ``<slug>.json``, ``<slug>.csv``, ``<slug>.md``,
``<slug>-time-vs-v.png``, ``<slug>-time-vs-n.png``, ``<slug>-memory.png``. JSON and CSV are rewritten after every shape,
so a run that is cut short still leaves its results.

This file is the command line; the suite's parts: ``bench_harness.py`` (shapes, inputs, reference, timing, memory),
``bench_impls.py`` (the implementations and one measurement), ``bench_report.py`` (the outputs).
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import NoReturn

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the suite's modules, also when loaded by path (tests)

from bench_harness import (DEFAULT_OUT, DTYPES, MODES, PAD_FRACTION, REPO_ROOT, GiB, Feed, L2Flush, Shape,  # noqa: E402
                           compute_reference, default_shapes, device_name, device_slug, free_memory, make_inputs,
                           measure_copy_bandwidth, parse_shapes)
from bench_impls import build_impls, measure  # noqa: E402
from bench_report import write_json_csv, write_markdown, write_plots  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def _import_fastce():
    try:
        import fastce
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT))  # run from a checkout that is not installed
        try:
            import fastce
        except ImportError:
            return None
    return fastce


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:
        return None
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(module_name.replace("_", "-"))
        except Exception:
            version = "unknown"
    return str(version)


IMPL_NAMES = ("fastce-triton", "fastce-cuda", "fastce-torch", "hf-eager", "hf-compile", "torch-f32", "liger", "quack")


def usage_error(message: str) -> NoReturn:
    """A mistake on the command line or a request this machine cannot serve: one line on stderr, exit code 2."""
    print(f"{Path(__file__).name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_device(text: str) -> torch.device:
    """``--device`` as a torch device; a usage error if it is not one, or names a CUDA device that is not here."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        usage_error(f"--device {text}: not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device here"
            usage_error(f"--device {text}: {why} (torch {torch.__version__}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            usage_error(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        usage_error(f"--device {text}: the suite runs on cpu or cuda")
    return device


def nothing_to_run(device: torch.device, impl_filter: list[str] | None, mode_filter: list[str] | None,
                   skipped: dict[str, str]) -> str:
    """Why ``build_impls`` found nothing to measure: what was asked for, and why each part of it cannot run."""
    asked = f"--impls {','.join(impl_filter)}" if impl_filter else "the default implementations"
    if mode_filter:
        asked += f" in --modes {','.join(mode_filter)}"
    reasons = [f"{name}: {reason}" for name, reason in skipped.items()]
    if not reasons:
        reasons.append("none of them has a mode in --modes" if mode_filter else "nothing matched")
    return f"nothing to measure on {device} for {asked}. " + "; ".join(reasons)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="standard shapes only, fewer reps, no sweeps")
    parser.add_argument("--sweep-impls", default="fastce,hf-eager",
                        help="comma-separated name prefixes of the implementations also run on the sweep shapes")
    parser.add_argument("--shapes", help="comma-separated BxTxV list (replaces the default shapes and sweeps)")
    parser.add_argument("--impls", help="comma-separated names or prefixes: fastce, fastce-triton, fastce-cuda, "
                                        "fastce-torch, hf-eager, hf-compile, torch-f32, liger, quack")
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="logits dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default benchmarks/results)")
    parser.add_argument("--slug", help="file-name prefix (default from the device name, e.g. h100)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 reference and error columns")
    parser.add_argument("--no-validate", action="store_true", help="call fastce with validate=False (no host sync)")
    parser.add_argument("--leaf-grad", action="store_true",
                        help="pass the leaf itself and read .grad (AccumulateGrad then copies an in-place gradient)")
    parser.add_argument("--reps", type=int, help="timed reps per measurement (default 20 GPU, 5 CPU; --quick 8/2)")
    parser.add_argument("--warmup", type=int, help="untimed calls after the correctness call (default 3; --quick 1)")
    parser.add_argument("--max-minutes", type=float, help="skip what is left after this long (default 7 on GPU, "
                                                          "0 = no limit); results so far are always written")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    """Run the suite; returns the path of the JSON results."""
    args = parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
    reps = args.reps or ((8 if args.quick else 20) if on_gpu else (2 if args.quick else 5))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    max_minutes = args.max_minutes if args.max_minutes is not None else (7.0 if on_gpu else 0.0)
    shapes = parse_shapes(args.shapes) if args.shapes else default_shapes(device, args.quick)
    split = lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None  # noqa: E731
    mode_filter = split(args.modes)
    if mode_filter and set(mode_filter) - set(MODES):
        usage_error(f"--modes: unknown {sorted(set(mode_filter) - set(MODES))}; choose from {MODES}")
    unknown = [token for token in split(args.impls) or []
               if not any(name == token or name.startswith(token + "-") for name in IMPL_NAMES)]
    if unknown:
        usage_error(f"--impls: unknown {unknown}; use names or prefixes of {', '.join(IMPL_NAMES)}")

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    fastce = _import_fastce()
    reference_fn = None
    if fastce is not None and not args.no_check:
        from fastce.reference import causal_lm_loss_reference as reference_fn
    impls, skipped = build_impls(fastce, device, split(args.impls), mode_filter, validate=not args.no_validate)
    if not impls:
        usage_error(nothing_to_run(device, split(args.impls), mode_filter, skipped))
    slug = args.slug or device_slug(device)

    log(f"device {device_name(device)} ({device}), logits {dtype}, {len(shapes)} shapes, {reps} reps, "
        f"{len(impls)} measurements per shape")
    for name, reason in skipped.items():
        log(f"not run: {name}: {reason}")
    copy_gbps, copy_bytes = measure_copy_bandwidth(device, args.quick)
    log(f"copy bandwidth: {copy_gbps:.0f} GB/s ({copy_bytes / GiB:.2g} GiB device-to-device, read + write)")

    header = {
        "device": device_name(device), "device_slug": slug, "device_type": device.type,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if on_gpu else None,
        "total_memory_gib": round(torch.cuda.get_device_properties(device).total_memory / GiB, 1) if on_gpu else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python_version": platform.python_version(), "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda, "triton_version": _version("triton"),
        "transformers_version": _version("transformers"),
        "fastce_version": getattr(fastce, "__version__", None) if fastce else None,
        "fastce_path": str(Path(fastce.__file__).parent) if fastce else None,
        "liger_version": _version("liger_kernel") if "liger" not in skipped else None,
        "quack_version": _version("quack") if "quack" not in skipped else None,
        "fastce_backends": list(fastce.available_backends()) if fastce else [],
        "copy_gbps": copy_gbps, "copy_bytes": copy_bytes, "dtype": str(dtype).replace("torch.", ""),
        "reps": reps, "warmup": warmup, "validate": not args.no_validate, "pad_fraction": PAD_FRACTION,
        "gradient_to": "leaf .grad (--leaf-grad)" if args.leaf_grad else "_GradSink (stands in for lm_head)",
        "timing": "median of per-rep CUDA-event times, L2 flushed before each rep" if on_gpu else
                  "median of per-rep perf_counter times",
        "skipped_impls": skipped, "argv": list(argv) if argv is not None else sys.argv[1:],
    }
    flush = L2Flush(device)
    sweep_prefixes = [p for p in args.sweep_impls.split(",") if p]
    elem = torch.empty((), dtype=dtype).element_size()
    rows: list[dict] = []
    for shape_index, shape in enumerate(shapes):
        base = {"batch": shape.batch, "seq_len": shape.seq_len, "vocab": shape.vocab, "rows": shape.rows,
                "dtype": header["dtype"], "sets": ";".join(shape.sets)}
        inputs = reference = None
        over_budget = lambda: max_minutes and time.perf_counter() - started > 60 * max_minutes  # noqa: E731
        try:
            if not over_budget():
                inputs = make_inputs(shape, dtype, device, args.seed + shape_index, args.leaf_grad)
        except torch.cuda.OutOfMemoryError:
            log(f"shape {shape.label()}: OOM while making the inputs")
            free_memory(device)
        if inputs is not None and reference_fn is not None:
            try:
                reference = compute_reference(inputs, reference_fn, device)
                base["ref_loss"] = reference[0]
            except Exception as exc:  # the timings are still worth having without the error columns
                log(f"shape {shape.label()}: no float64 reference ({type(exc).__name__}: {exc})")
                free_memory(device)
        if inputs is not None:
            log(f"shape {shape.label()} ({', '.join(shape.sets)}): "
                f"{int(inputs.num_items)} targets of {shape.batch * (shape.seq_len - 1)}")
        for impl in impls:
            if "standard" not in shape.sets and not any(impl.name.startswith(p) for p in sweep_prefixes):
                continue  # the sweeps are for the plots of fastce (and eager, for scale)
            row = {"impl": impl.name, "mode": impl.mode, **base}
            if over_budget():
                row["status"] = f"skipped: time budget of {max_minutes:g} min"
            elif inputs is None:
                row["status"] = "OOM: inputs"
            else:
                feed = Feed(inputs, impl.inplace, args.leaf_grad)
                try:
                    row.update(measure(impl, impl.make(), feed, reference, device, reps, warmup, flush))
                    row["status"] = "ok"
                except torch.cuda.OutOfMemoryError:
                    row["status"] = "OOM"
                except Exception as exc:  # one broken implementation must not end the suite
                    row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if row["status"] != "ok":
                    feed.reset(restore=True)
                    free_memory(device)
                del feed
            if row["status"] == "ok":
                nbytes = shape.rows * shape.vocab * elem * (1 if impl.mode == "fwd" else 2)
                row.update(bytes=nbytes, gbps=nbytes / (row["median_ms"] * 1e-3) / 1e9)
                row["frac_of_copy"] = row["gbps"] / copy_gbps
                if row.get("peak_extra_bytes") is not None:
                    row["peak_extra_gib"] = row["peak_extra_bytes"] / GiB
            rows.append(row)
            log(_progress_line(shape, row))
        del inputs, reference
        free_memory(device)
        write_json_csv(args.out, slug, header, rows)

    header["wall_s"] = round(time.perf_counter() - started, 1)
    paths = write_json_csv(args.out, slug, header, rows)
    paths.append(write_markdown(args.out, slug, header, rows))
    if not args.no_plots:
        try:
            paths += write_plots(args.out, slug, header, rows)
        except Exception as exc:  # a plotting problem must not lose the numbers
            log(f"plots failed: {type(exc).__name__}: {exc}")
    log(f"done in {header['wall_s']:.0f}s; wrote " + ", ".join(str(p) for p in paths))
    return paths[0]


def _progress_line(shape: Shape, row: dict) -> str:
    text = f"{shape.label():>16} {row['impl']:<14} {row['mode']:<16}"
    if row["status"] != "ok":
        return f"{text} {row['status']}"
    text += f" {row['median_ms']:9.3f} ms {row['gbps']:7.0f} GB/s {100 * row['frac_of_copy']:4.0f}% copy"
    if row.get("peak_extra_gib") is not None:
        text += f"  peak +{row['peak_extra_gib']:.2f} GiB"
    if row.get("loss_rel_err") is not None:
        text += f"  loss err {row['loss_rel_err']:.1e}"
    if row.get("grad_rel_err") is not None:
        text += f"  grad err {row['grad_rel_err']:.1e}"
    if row.get("grad_aliases_logits") is False:
        text += "  (grad copied out of the logits)"
    if row.get("logits_intact") is False:
        text += "  (LOGITS MODIFIED)"
    return text


if __name__ == "__main__":
    main()
