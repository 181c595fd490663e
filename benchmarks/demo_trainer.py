"""Demo: train a tiny causal LM with ``transformers.Trainer`` under gradient accumulation, with and without fastce.

::

    python benchmarks/demo_trainer.py                         # CPU or GPU, whichever is there (< 1 min on a CPU)
    python benchmarks/demo_trainer.py --device cuda --vocab-size 128256 --dtype bfloat16 --seq-len 2048 \
        --hidden-size 512 --batch-size 8 --grad-accum 4

Both runs start from the same random Llama weights and see the same sequences in the same order: windows of
random length cut from the Zen of Python (``import this``, so nothing is downloaded), one token per character,
right-padded per micro-batch with labels -100 on the padding. The per-step losses are printed side by side. They
agree to float32 rounding, because fastce computes transformers' ``ForCausalLMLoss`` exactly, including the
division by ``num_items_in_batch`` that makes the accumulated micro-batches equal one big batch. (With bfloat16
weights they differ by ~1e-5 from the second step on: now and then a gradient element rounds to the neighbouring
bfloat16 value, and the weights drift apart by that much.) Wall time per run is printed too, and on a GPU the peak
memory; there each variant first runs forward and backward over every micro-batch once, untimed, so that kernel
compilation and autotuning are not counted.

``--vocab-size`` pads the character vocabulary with ids that never occur, to give the logits a realistic width
(128256 for Llama 3): that is where the loss dominates memory and time, and where fastce saves them.
"""
from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import io
import platform
import time

import torch

PAD_ID = 0


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


def make_dataset(token_ids: list[int], count: int, min_len: int, max_len: int, seed: int) -> list[dict]:
    """``count`` windows of the text, of random lengths in ``[min_len, max_len]`` (uneven padding on purpose)."""
    generator = torch.Generator().manual_seed(seed)
    token_ids = token_ids * (max_len // len(token_ids) + 1)  # the text repeated, for windows longer than the text
    examples = []
    for _ in range(count):
        length = int(torch.randint(min_len, max_len + 1, (), generator=generator))
        start = int(torch.randint(0, len(token_ids) - length + 1, (), generator=generator))
        examples.append({"input_ids": token_ids[start : start + length]})
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


def warm_up(name: str, initial_model, dataset, args, device: torch.device) -> None:
    """Forward and backward over every micro-batch once, untimed: compiles and autotunes what the run will use."""
    import fastce

    model = copy.deepcopy(initial_model).to(device)
    if name == "fastce":
        fastce.patch_model(model, backend=args.backend)
    for start in range(0, len(dataset), args.batch_size):
        batch = {key: value.to(device) for key, value in collate(dataset[start : start + args.batch_size]).items()}
        model(**batch).loss.backward()
    del model
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def train(name: str, initial_model, dataset, args, device: torch.device) -> dict:
    """One Trainer run; returns its per-step losses, wall time and (on a GPU) peak memory."""
    import transformers
    from transformers.trainer_callback import PrinterCallback

    import fastce

    model = copy.deepcopy(initial_model)
    if name == "fastce" and args.patch == "model":
        fastce.patch_model(model, backend=args.backend)
    training_args = transformers.TrainingArguments(
        output_dir=str(args.output_dir / name),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",  # both runs see the same micro-batches
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
    seconds = time.perf_counter() - start
    result = {
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "seconds": seconds,
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    return result


def parse_args(argv=None):
    from pathlib import Path
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="per-device micro-batch size")
    parser.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation steps")
    parser.add_argument("--seq-len", type=int, default=96, help="longest sequence (characters)")
    parser.add_argument("--min-len", type=int, default=8, help="shortest sequence (characters)")
    parser.add_argument("--vocab-size", type=int, default=0, help="pad the vocabulary to this size (0: no padding)")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="of the weights (pure)")
    parser.add_argument("--lr", type=float, default=3e-3)
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
    parser.add_argument("--output-dir", type=Path, default=None, help="Trainer output dir (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = Path(tempfile.mkdtemp(prefix="fastce-demo-"))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers

    import fastce

    transformers.logging.set_verbosity_error()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.warmup is None:
        args.warmup = device.type == "cuda"

    text = zen_of_python()
    tokenizer = CharTokenizer(text)
    vocab_size = max(len(tokenizer), args.vocab_size)
    dataset = make_dataset(
        tokenizer.encode(text), args.steps * args.batch_size * args.grad_accum, args.min_len, args.seq_len, args.seed
    )
    initial_model = make_model(args, vocab_size)

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(
        f"device {device} ({device_name}), torch {torch.__version__}, transformers {transformers.__version__}, "
        f"fastce {fastce.__version__} (backends here: {', '.join(fastce.available_backends())})"
    )
    print(
        f"Llama {args.layers} layers x {args.hidden_size}, vocab {vocab_size}, {args.dtype}; {len(dataset)} sequences "
        f"of {args.min_len}..{args.seq_len} characters; batch {args.batch_size} x accumulation "
        f"{args.grad_accum}, {args.steps} steps; fastce via --patch {args.patch}, backend {args.backend}"
    )

    results = {}
    for name in ("transformers", "fastce"):
        if args.warmup:
            warm_up(name, initial_model, dataset, args, device)
        results[name] = train(name, initial_model, dataset, args, device)

    stock, ours = results["transformers"]["losses"], results["fastce"]["losses"]
    print(f"\n{'step':>4}  {'transformers':>12}  {'fastce':>12}  {'|difference|':>12}")
    for step, (a, b) in enumerate(zip(stock, ours), start=1):
        print(f"{step:>4}  {a:>12.6f}  {b:>12.6f}  {abs(a - b):>12.2e}")
    print()
    for name, result in results.items():
        line = f"{name:>12}: {result['seconds']:.2f} s"
        if "peak_gib" in result:
            line += f", peak GPU memory {result['peak_gib']:.2f} GiB"
        print(line)
    worst = max(abs(a - b) / abs(a) for a, b in zip(stock, ours))
    print(f"largest relative difference of the per-step losses: {worst:.1e}")


if __name__ == "__main__":
    main()
