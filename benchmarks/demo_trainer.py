"""Demo: the gradient-accumulation bug fastce exists to fix, and the fix, on a tiny causal LM with ``Trainer``.

::

    python benchmarks/demo_trainer.py                    # CPU (~10 s), or the GPU when there is one
    python benchmarks/demo_trainer.py --device cpu       # the CPU even when there is a GPU
    python benchmarks/demo_trainer.py --device cuda --vocab-size 128256 --dtype bfloat16 --seq-len 1024 \\
        --hidden-size 512 --batch-size 4 --grad-accum 4

Three ``transformers.Trainer`` runs train the same random Llama on the same sequences, in the same order, with the
same optimizer; each optimizer step sees the same ``batch-size x grad-accum`` sequences:

* **full batch**: all of them in one micro-batch (no accumulation), transformers' own loss: the reference (and the
  memory that accumulation exists to save: size ``--batch-size`` and ``--grad-accum`` by what it can hold);
* **mean of means** (the bug): ``grad-accum`` micro-batches, each loss the mean over its own tokens, divided by
  ``grad-accum``. That is what every ``Trainer`` did before transformers 4.46, and what it still does for a model
  whose ``forward`` takes no loss kwargs (here: ``model.accepts_loss_kwargs = False``). It weights each micro-batch
  alike, so a token of a short micro-batch counts more than a token of a long one;
* **fastce** (the fix): the same micro-batches, the loss by ``fastce.causal_lm_loss`` with ``num_items_in_batch``,
  the count of shifted non-padding targets of the whole step, which ``Trainer`` counts and passes: each micro-batch
  contributes its sum of token losses over that count, and the step adds up to the full batch's mean exactly.

The data: windows of random length cut from the Zen of Python (``import this``, so nothing is downloaded), one
token per character, right-padded per micro-batch with labels -100 on the padding. Within each optimizer step the
sequences are ordered by length, as length-grouped samplers (``group_by_length``) tend to do, so the micro-batches
of a step hold very different token counts. Printed: the per-step losses side by side, the largest differences of
each accumulation run against the full batch (losses and final weights), wall time per run (on a GPU, peak memory
too); written: a PNG of the three loss curves (``--out``).

With float32 weights fastce's losses equal the full batch's to float32 rounding: ~1e-7 relative at the first step,
up to ~1e-6 later as the weights' rounding differences add up (the order of the sums differs). With bfloat16 weights
they differ by 1e-5..1e-4 from the second step on: now and then a gradient element rounds to the neighbouring
bfloat16 value. The mean of means is off by ~1e-2 (CPU default) and its weights by a fifth to a third of an update.
``--vocab-size`` pads the character vocabulary with ids that never occur, to give the logits a realistic width
(128256 for Llama 3), where the loss dominates memory and time.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import io
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

PAD_ID = 0
RESULTS = Path(__file__).resolve().parent / "results"
RUNS = {  # name: (column title, what it is)
    "full": ("full batch", "one micro-batch per step, transformers' loss"),
    "bug": ("mean of means", "accumulation, each micro-batch's own mean / grad-accum (the bug)"),
    "fastce": ("fastce", "accumulation, fastce with num_items_in_batch (the fix)"),
}
# Sizes when not given on the command line: a CPU run that takes seconds, a GPU run a little more real.
DEFAULTS = {
    "cpu": dict(steps=12, batch_size=4, grad_accum=4, seq_len=96, min_len=4, vocab_size=0, hidden_size=64, layers=2),
    "cuda": dict(steps=16, batch_size=8, grad_accum=4, seq_len=512, min_len=8, vocab_size=32000, hidden_size=256,
                 layers=4),
}


def zen_of_python() -> str:
    """The text of ``import this``, read without printing it (importing ``this`` prints the Zen once)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


class CharTokenizer:
    """One id per distinct character; id 0 is padding."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.ids = {char: index + 1 for index, char in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.ids[char] for char in text]


def make_dataset(token_ids: list[int], steps: int, per_step: int, min_len: int, max_len: int, seed: int) -> list[dict]:
    """``steps * per_step`` windows of the text, of random lengths in ``[min_len, max_len]``, sorted by length
    within each step's ``per_step`` sequences (so a step's micro-batches go from short to long)."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = token_ids * (max_len // len(token_ids) + 1)  # the text repeated, for windows longer than the text
    examples = []
    for _ in range(steps):
        step = []
        for _ in range(per_step):
            length = int(torch.randint(min_len, max_len + 1, (), generator=generator))
            start = int(torch.randint(0, len(token_ids) - length + 1, (), generator=generator))
            step.append({"input_ids": token_ids[start : start + length]})
        examples += sorted(step, key=lambda example: len(example["input_ids"]))
    return examples


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pads to the longest sequence of the micro-batch; labels are the inputs, -100 on padding."""
    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.full((len(examples), width), PAD_ID)
    attention_mask = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        attention_mask[row, : len(example["input_ids"])] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_model(args, vocab_size: int):
    import transformers

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=2 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.LlamaForCausalLM(config).to(getattr(torch, args.dtype))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms`` for the runs, the previous setting restored after (tests call main()).
    On a GPU that makes reruns repeat bit for bit (the embedding's and attention's backward use atomics otherwise);
    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first call for that."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)  # warn_only=True would keep attention's non-deterministic backward
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def split_of(name: str, args) -> tuple[int, int]:
    """(micro-batch size, accumulation steps) of a run: the same sequences per optimizer step for all three."""
    return (args.batch_size * args.grad_accum, 1) if name == "full" else (args.batch_size, args.grad_accum)


def micro_batch_targets(dataset: list[dict], args) -> list[int]:
    """The shifted target count of each micro-batch of the first step (what the bug weights alike)."""
    return [sum(len(example["input_ids"]) - 1 for example in dataset[start : start + args.batch_size])
            for start in range(0, args.batch_size * args.grad_accum, args.batch_size)]


def warm_up(name: str, initial_model, dataset, args, device: torch.device) -> None:
    """Forward and backward over every micro-batch once, untimed: compiles and autotunes what the run will use."""
    import fastce

    model = copy.deepcopy(initial_model).to(device)
    if name == "fastce":
        fastce.patch_model(model, backend=args.backend)
    batch_size = split_of(name, args)[0]
    for start in range(0, len(dataset), batch_size):
        batch = {key: value.to(device) for key, value in collate(dataset[start : start + batch_size]).items()}
        model(**batch).loss.backward()
    del model
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def train(name: str, initial_model, dataset, args, device: torch.device) -> dict:
    """One Trainer run; returns its per-step losses, final weights (float32, on the CPU), wall time and (on a GPU)
    peak memory."""
    import transformers
    from transformers.trainer_callback import PrinterCallback

    import fastce

    batch_size, grad_accum = split_of(name, args)
    model = copy.deepcopy(initial_model)
    if name == "bug":
        # Trainer then neither counts nor passes num_items_in_batch: the model's loss is the mean over the
        # micro-batch's own targets, and Trainer divides it by the accumulation steps (transformers < 4.46).
        model.accepts_loss_kwargs = False
    if name == "fastce" and args.patch == "model":
        fastce.patch_model(model, backend=args.backend)
    training_args = transformers.TrainingArguments(
        output_dir=str(args.output_dir / name),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",  # every run sees the same sequences in the same order
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device.type == "cpu",
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if name == "fastce" and args.patch == "transformers":
        patch = fastce.patched_transformers(backend=args.backend)
    else:
        patch = contextlib.nullcontext()
    with patch:  # entered before the Trainer is built, the usual order
        trainer = transformers.Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate)
        trainer.remove_callback(PrinterCallback)  # we print our own table
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize()
    result = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "weights": {key: param.detach().float().cpu() for key, param in trainer.model.named_parameters()},
        "seconds": time.perf_counter() - start,
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    return result


def differences(run: dict, full: dict, initial_weights: dict) -> dict:
    """The largest differences of ``run`` against the full batch: per-step losses (absolute, relative) and final
    weights (largest element, and the norm of the difference over the norm of the full batch's whole update)."""
    loss_abs = max(abs(a - b) for a, b in zip(run["losses"], full["losses"]))
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], full["losses"]))
    weight_abs, diff_sq, update_sq = 0.0, 0.0, 0.0
    for key, weight in run["weights"].items():
        reference = full["weights"][key]
        weight_abs = max(weight_abs, float((weight - reference).abs().max()))
        diff_sq += float((weight.double() - reference.double()).square().sum())
        update_sq += float((reference.double() - initial_weights[key].double()).square().sum())
    return {"loss_abs": loss_abs, "loss_rel": loss_rel, "weight_abs": weight_abs,
            "weight_rel": math.sqrt(diff_sq / update_sq) if update_sq else math.inf}


def plot(results: dict, title: str, path: Path) -> None:
    """The three loss curves, and below them each accumulation run's distance from the full batch (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True, height_ratios=[2, 1])
    steps = range(1, len(results["full"]["losses"]) + 1)
    style = {"full": dict(color="black", linewidth=5, alpha=0.3), "bug": dict(color="tab:red", marker="o"),
             "fastce": dict(color="tab:blue", marker="x", linestyle="--")}
    for name, result in results.items():
        top.plot(steps, result["losses"], label=f"{RUNS[name][0]}: {RUNS[name][1]}", **style[name])
    top.set_ylabel("training loss")
    top.set_title(title, fontsize=9)
    top.legend(fontsize=8)
    floor = 1e-9  # where an exact 0 is drawn on the log scale
    for name in ("bug", "fastce"):
        gaps = [max(abs(a - b) / abs(b), floor) for a, b in zip(results[name]["losses"], results["full"]["losses"])]
        bottom.semilogy(steps, gaps, label=RUNS[name][0], **style[name])
    bottom.set_ylabel(f"|loss / full batch - 1|\n(0 drawn at {floor:g})", fontsize=8)
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    sizes = "(default: CPU {cpu}, GPU {cuda})"
    for option, help_text in [("steps", "optimizer steps"), ("batch-size", "micro-batch size under accumulation"),
                              ("grad-accum", "gradient accumulation steps"),
                              ("seq-len", "longest sequence (characters)"), ("min-len", "shortest sequence"),
                              ("vocab-size", "pad the vocabulary to this size (0: no padding)"),
                              ("hidden-size", "model width"), ("layers", "decoder layers")]:
        key = option.replace("-", "_")
        parser.add_argument(f"--{option}", type=int, default=None,
                            help=f"{help_text} {sizes.format(cpu=DEFAULTS['cpu'][key], cuda=DEFAULTS['cuda'][key])}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the weights (pure)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW, constant")
    parser.add_argument("--backend", default="auto", help="fastce backend: auto, triton, cuda or torch")
    parser.add_argument(
        "--patch", default="transformers", choices=["transformers", "model"],
        help="fastce.patched_transformers() around building and training the Trainer, or fastce.patch_model(model)",
    )
    parser.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=None,
        help="untimed forward+backward over the data before each run (default: on a GPU only)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.use_deterministic_algorithms during the runs (default: on)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG of the loss curves (default: benchmarks/results/demo-trainer-<cpu|gpu>.png)")
    parser.add_argument("--output-dir", type=Path, default=None, help="Trainer output dir (default: a temp dir)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the three trainings, print the comparison, write the plot; returns ``{"runs": {name: result},
    "differences": {"bug": ..., "fastce": ...}, "plot": path}``."""
    args = parse_args(argv)
    import transformers

    import fastce

    transformers.logging.set_verbosity_error()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")
    for key, value in DEFAULTS[device.type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = device.type == "cuda"
    if args.output_dir is None:
        args.output_dir = Path(tempfile.mkdtemp(prefix="fastce-demo-"))
    if args.out is None:
        args.out = RESULTS / f"demo-trainer-{'gpu' if device.type == 'cuda' else 'cpu'}.png"

    text = zen_of_python()
    tokenizer = CharTokenizer(text)
    vocab_size = max(len(tokenizer), args.vocab_size)
    per_step = args.batch_size * args.grad_accum
    dataset = make_dataset(tokenizer.encode(text), args.steps, per_step, args.min_len, args.seq_len, args.seed)
    initial_model = make_model(args, vocab_size)
    initial_weights = {key: param.detach().float().clone() for key, param in initial_model.named_parameters()}

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"device {device} ({device_name}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"fastce {fastce.__version__} (backends here: {', '.join(fastce.available_backends())})"
    )
    print(
        f"Llama {args.layers} layers x {args.hidden_size}, vocab {vocab_size}, {args.dtype}, AdamW lr {args.lr:g}; "
        f"{args.steps} steps of {per_step} sequences ({args.min_len}..{args.seq_len} characters, sorted by length "
        f"within a step); accumulation: {args.grad_accum} micro-batches of {args.batch_size}; fastce via --patch "
        f"{args.patch}, backend {args.backend}"
    )
    print(f"targets per micro-batch, step 1: {', '.join(str(n) for n in micro_batch_targets(dataset, args))}")

    results = {}
    with deterministic_algorithms(args.deterministic):
        for name in RUNS:
            if args.warmup:
                warm_up(name, initial_model, dataset, args, device)
            results[name] = train(name, initial_model, dataset, args, device)

    titles = [RUNS[name][0] for name in ("full", "fastce", "bug")]  # fastce beside the full batch it equals
    print(f"\n{'step':>4}  {titles[0]:>13}  {titles[1]:>13}  {titles[2]:>13}")
    for step, losses in enumerate(zip(*(results[name]["losses"] for name in ("full", "fastce", "bug"))), start=1):
        print(f"{step:>4}  " + "  ".join(f"{loss:>13.6f}" for loss in losses))

    print("\nlargest differences against the full batch:")
    print(f"{'':>15}  {'loss abs':>9}  {'loss rel':>9}  {'weight abs':>10}  {'|dw| / |update|':>15}")
    diffs = {}
    for name in ("fastce", "bug"):
        diffs[name] = diff = differences(results[name], results["full"], initial_weights)
        print(f"{RUNS[name][0]:>15}  {diff['loss_abs']:>9.1e}  {diff['loss_rel']:>9.1e}  {diff['weight_abs']:>10.1e}"
              f"  {diff['weight_rel']:>15.1e}")
    print("(|dw| / |update|: the norm of the final weights' difference over the norm of the full batch's update)")
    print()
    for name, result in results.items():
        line = f"{RUNS[name][0]:>15}: {result['seconds']:.2f} s"
        if "peak_gib" in result:
            line += f", peak GPU memory {result['peak_gib']:.2f} GiB"
        print(line)

    title = (f"Llama {args.layers}x{args.hidden_size}, vocab {vocab_size}, {args.dtype}, {device_name}\n"
             f"{per_step} sequences per step; accumulation: {args.grad_accum} micro-batches of {args.batch_size}")
    plot(results, title, args.out)
    print(f"wrote {args.out}")
    return {"runs": results, "differences": diffs, "plot": args.out}


if __name__ == "__main__":
    main()
