"""The benchmark suite's outputs: JSON, CSV, the markdown table and the plots (benchmarks/bench_cross_entropy.py)."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from bench_harness import PAD_FRACTION, GiB


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
CSV_FIELDS = ["impl", "mode", "batch", "seq_len", "vocab", "rows", "dtype", "sets", "status", "median_ms", "min_ms",
              "p90_ms", "reps", "bytes", "gbps", "frac_of_copy", "peak_extra_bytes", "peak_extra_gib", "loss",
              "ref_loss", "loss_rel_err", "grad_max_abs_err", "grad_rel_err", "grad_aliases_logits", "logits_intact"]


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_csv(out: Path, slug: str, header: dict, rows: list[dict]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{slug}.json", out / f"{slug}.csv"
    payload = {"header": header, "rows": [{k: _clean(v) for k, v in row.items()} for row in rows]}
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    with csv_path.open("w", newline="") as handle:
        for key, value in header.items():
            handle.write(f"# {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}\n")
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _clean(row.get(k)) is None else row.get(k)) for k in CSV_FIELDS})
    return [json_path, csv_path]


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _time_cell(row: dict) -> str:
    return _fmt(row.get("median_ms"), ".3f") if row["status"] == "ok" else row["status"].split(":")[0]


def write_markdown(out: Path, slug: str, header: dict, rows: list[dict]) -> Path:
    lines = [f"# fastce benchmark: {header['device']}", ""]
    versions = " · ".join(f"{name} {header.get(name + '_version')}" for name in
                          ("torch", "triton", "transformers", "fastce", "liger", "quack")
                          if header.get(name + "_version"))
    lines += [f"{versions} · CUDA {header.get('cuda_version')} · {header['date']}", "",
              f"Copy bandwidth ({header['copy_bytes'] / GiB:.2g} GiB copy, read + write): "
              f"**{header['copy_gbps']:.0f} GB/s**. Logits {header['dtype']}, {PAD_FRACTION:.0%} padding, "
              f"num_items_in_batch a device tensor; fastce validate={header['validate']}.", "",
              f"Time: {header['timing']}. GB/s: B·T·V·elem bytes for fwd, "
              "twice that for fwd+bwd (read logits, write gradient). Peak: memory allocated above the logits and "
              "labels during one call, the gradient included. Errors: against the float64 reference; grad err is "
              "the relative L2 norm.", ""]
    shape_keys: list[tuple] = []
    for row in rows:
        key = (row["batch"], row["seq_len"], row["vocab"])
        if key not in shape_keys:
            shape_keys.append(key)
    for key in shape_keys:
        shape_rows = [r for r in rows if (r["batch"], r["seq_len"], r["vocab"]) == key]
        if "standard" not in shape_rows[0]["sets"]:
            continue
        lines += [f"## B={key[0]}, T={key[1]}, V={key[2]} ({shape_rows[0]['dtype']})", "",
                  "| impl | mode | time (ms) | GB/s | % of copy | peak extra (GiB) | loss rel. err | grad rel. err |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in shape_rows:
            lines.append(f"| {r['impl']} | {r['mode']} | {_time_cell(r)} | {_fmt(r.get('gbps'), '.0f')} | "
                         f"{_fmt(None if r.get('frac_of_copy') is None else 100 * r['frac_of_copy'], '.0f')} | "
                         f"{_fmt(r.get('peak_extra_gib'), '.2f')} | {_fmt(r.get('loss_rel_err'), '.1e')} | "
                         f"{_fmt(r.get('grad_rel_err'), '.1e')} |")
        lines.append("")
    if len(shape_keys) > 1:
        labels = ["×".join(str(x) for x in key) for key in shape_keys]
        lines += ["## Median time (ms) on every shape (B×T×V)", "",
                  "| impl | mode | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
        for name, mode in dict.fromkeys((r["impl"], r["mode"]) for r in rows):
            cells = []
            for key in shape_keys:
                match = [r for r in rows if (r["impl"], r["mode"]) == (name, mode)
                         and (r["batch"], r["seq_len"], r["vocab"]) == key]
                cells.append(_time_cell(match[0]) if match else "")
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    if header.get("skipped_impls"):
        lines += ["Not run: " + "; ".join(f"{k} ({v})" for k, v in header["skipped_impls"].items()) + ".", ""]
    path = out / f"{slug}.md"
    path.write_text("\n".join(lines))
    return path


def write_plots(out: Path, slug: str, header: dict, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok" and r["mode"] != "fwd"]
    series = list(dict.fromkeys((r["impl"], r["mode"]) for r in ok))
    copy_bps = header["copy_gbps"] * 1e9
    paths = []

    def floor_ms(rows_, vocab, elem):  # the bytes floor at the measured copy bandwidth
        return 2 * rows_ * vocab * elem / copy_bps * 1e3

    def draw(ax, points_of, x_of, floor_of, xs):
        for name, mode in series:
            points = sorted((x_of(r), r["median_ms"]) for r in points_of(name, mode))
            if len(points) >= 2:
                ax.plot(*zip(*points), marker="o", label=f"{name} ({mode})" if mode != "fwd+bwd" else name)
        ax.plot(xs, [floor_of(x) for x in xs], "k--", linewidth=1, label="copy-bandwidth floor")
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd time (ms)")
        ax.grid(True, which="both", alpha=0.3)

    elem = {"bfloat16": 2, "float16": 2, "float32": 4}.get(header["dtype"], 2)
    by_rows: dict[int, set] = {}
    for r in ok:
        by_rows.setdefault(r["rows"], set()).add(r["vocab"])
    if by_rows and max(len(v) for v in by_rows.values()) >= 2:
        n_rows = max(by_rows, key=lambda n: (len(by_rows[n]), n))
        vocabs = sorted(by_rows[n_rows])
        fig, ax = plt.subplots(figsize=(8, 5))
        draw(ax, lambda name, mode: [r for r in ok if (r["impl"], r["mode"]) == (name, mode) and r["rows"] == n_rows],
             lambda r: r["vocab"], lambda v: floor_ms(n_rows, v, elem), vocabs)
        ax.set_xlabel("vocabulary size V")
        ax.set_title(f"{header['device']}: time vs V, N = B·T = {n_rows} rows, {header['dtype']}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(out / f"{slug}-time-vs-v.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    by_vocab: dict[int, set] = {}
    for r in ok:
        by_vocab.setdefault(r["vocab"], set()).add(r["rows"])
    vocabs = sorted((v for v in by_vocab if len(by_vocab[v]) >= 2), key=lambda v: (-len(by_vocab[v]), -v))[:2]
    if vocabs:
        fig, axes = plt.subplots(1, len(vocabs), figsize=(7 * len(vocabs), 5), squeeze=False)
        for ax, vocab in zip(axes[0], sorted(vocabs)):
            ns = sorted(by_vocab[vocab])
            draw(ax, lambda name, mode: [r for r in ok if (r["impl"], r["mode"]) == (name, mode)
                                         and r["vocab"] == vocab],
                 lambda r: r["rows"], lambda n: floor_ms(n, vocab, elem), ns)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rows N = B·T")
            ax.set_title(f"time vs N, V = {vocab}")
            ax.legend(fontsize=7)
        fig.suptitle(f"{header['device']} ({header['dtype']})")
        fig.tight_layout()
        paths.append(out / f"{slug}-time-vs-n.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    mem = [r for r in rows if "standard" in r["sets"] and r["mode"] != "fwd"]
    if any(r.get("peak_extra_gib") is not None for r in mem):
        keys = list(dict.fromkeys((r["batch"], r["seq_len"], r["vocab"]) for r in mem))
        mem_series = list(dict.fromkeys((r["impl"], r["mode"]) for r in mem))
        width = 0.8 / len(mem_series)
        fig, ax = plt.subplots(figsize=(max(8, 2.5 * len(keys)), 5))
        for i, (name, mode) in enumerate(mem_series):
            xs, ys = [], []
            for j, key in enumerate(keys):
                match = [r for r in mem if (r["impl"], r["mode"]) == (name, mode)
                         and (r["batch"], r["seq_len"], r["vocab"]) == key]
                if not match:
                    continue
                x = j + (i - (len(mem_series) - 1) / 2) * width
                if match[0].get("peak_extra_gib") is not None:
                    xs.append(x)
                    ys.append(match[0]["peak_extra_gib"])
                elif not match[0]["status"].startswith("skipped"):  # OOM or error: say so where the bar would be
                    ax.text(x, 0, match[0]["status"].split(":")[0], rotation=90, ha="center", va="bottom", fontsize=6)
            bars = ax.bar(xs, ys, width=width, label=f"{name} ({mode})" if mode != "fwd+bwd" else name)
            ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xticks(range(len(keys)), ["×".join(str(x) for x in key) for key in keys])
        ax.set_ylabel("peak extra memory, fwd+bwd (GiB)")
        ax.set_title(f"{header['device']}: memory above logits + labels ({header['dtype']})")
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"{slug}-memory.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
