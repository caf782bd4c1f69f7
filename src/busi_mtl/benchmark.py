"""Where training time goes: ``python scripts/benchmark.py [--device cuda --precision bf16-mixed ...]``.

Five measurements of one model configuration, in images per second:

(a) ``raw``: a hand-written PyTorch loop (forward, the project's loss, backward, clipping, Adam) on
    random tensors already in memory: the ceiling.
(b) ``lightning``: the same model through the project's MultiTaskModule and a Lightning Trainer on the
    same in-memory tensors; (b)/(a) is the framework's overhead (target >= 0.95).
(c) ``dataloader``: the project's train DataLoader alone (cached preprocessing + augmentation, the
    configured workers) on a synthetic BUSI set; (c)/(a) must be >= 3 so loading never limits.
(d) ``epoch``: full training epochs through BUSIDataModule + MultiTaskModule + Trainer on that set;
    (d)/(a) shows any remaining bottleneck (target >= 0.90).
(e) ``inference``: batched images/s and single-image latency.

Also the model's forward FLOPs per image (torch's FlopCounterMode) and the FLOP rate achieved in (a).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from busi_mtl.data.datamodule import BUSIDataModule
from busi_mtl.data.synthetic import generate_busi
from busi_mtl.losses import MultiTaskLoss
from busi_mtl.models.factory import build_model
from busi_mtl.models.module import MultiTaskModule
from busi_mtl.utils.run import resolve_device

AMP_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str):
    dtype = AMP_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


class RandomBatches(Dataset):
    """Pre-generated batches in memory: the same inputs for (a) and (b), with no loading cost."""

    def __init__(self, count: int, batch_size: int, size: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.batches = [
            {
                "image": torch.rand(batch_size, 1, size, size, generator=g),
                "mask": (torch.rand(batch_size, 1, size, size, generator=g) > 0.9).float(),
                "label": torch.randint(0, 3, (batch_size,), generator=g),
                "id": [f"r{i}" for i in range(batch_size)],
            }
            for _ in range(count)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def model_flops(net: torch.nn.Module, size: int, device: torch.device) -> int:
    """Forward FLOPs for one image (multiply-add = 2 FLOPs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.eval()(torch.rand(1, 1, size, size, device=device))
    return counter.get_total_flops()


def bench_raw(net_cfg: dict, data: RandomBatches, device: torch.device, args) -> float:
    """(a) Images/s of a hand-written training loop."""
    torch.manual_seed(0)
    net = build_model(**net_cfg).to(device).train()
    criterion = MultiTaskLoss().to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    step_fn = torch.compile(net) if args.compile else net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    times = []
    for i, batch in enumerate(data.batches):
        images, masks, labels = (batch[k].to(device, non_blocking=True) for k in ("image", "mask", "label"))
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, args.precision):
            mask_logits, class_logits = step_fn(images)
        loss = criterion(mask_logits, class_logits, masks, labels)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return args.batch_size * len(times) / sum(times)


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start to batch end) after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.images = warmup, [], 0
        self._start = 0.0
        self.epoch_times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)
            self.images += len(batch["label"])

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.epoch_times.append(time.perf_counter() - self._epoch_start)


def _trainer(args, device: torch.device, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=args.precision,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=callbacks,
        **kwargs,
    )


def _module(net_cfg: dict, args) -> MultiTaskModule:
    torch.manual_seed(0)
    return MultiTaskModule(
        net=net_cfg,
        loss={},
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-4},
        scheduler={"name": "none"},
        compile=args.compile,
        channels_last=args.channels_last,
    )


def bench_lightning(net_cfg: dict, data: RandomBatches, device: torch.device, args) -> float:
    """(b) Images/s of the project's LightningModule + Trainer on the same in-memory batches."""
    timer = StepTimer(args.warmup)
    loader = DataLoader(data, batch_size=None, shuffle=False, pin_memory=device.type == "cuda")
    _trainer(args, device, [timer], max_steps=len(data)).fit(_module(net_cfg, args), loader)
    return timer.images / sum(timer.times)


def bench_dataloader(datamodule: BUSIDataModule, batches: int) -> dict:
    """(c) Images/s delivered by the train DataLoader, excluding the first batch (worker start-up)."""
    loader = datamodule.train_dataloader()
    count, start, first = 0, time.perf_counter(), None
    for epoch in range(100):
        for batch in loader:
            if first is None:
                first = time.perf_counter() - start
                start = time.perf_counter()
                continue
            count += len(batch["label"])
            if count >= batches * datamodule.hparams.batch_size:
                return {
                    "images_per_s": count / (time.perf_counter() - start),
                    "first_batch_s": first,
                    "epochs": epoch + 1,
                }
    return {"images_per_s": count / (time.perf_counter() - start), "first_batch_s": first, "epochs": 100}


def bench_epoch(net_cfg: dict, datamodule: BUSIDataModule, device: torch.device, args) -> dict:
    """(d) Full training epochs through the project; the first epoch (warm-up, worker start) is dropped."""
    timer = StepTimer(args.warmup)
    _trainer(args, device, [timer], max_epochs=args.epochs).fit(_module(net_cfg, args), datamodule=datamodule)
    train_images = len(datamodule.datasets["train"]) // args.batch_size * args.batch_size
    steady = timer.epoch_times[1:] or timer.epoch_times
    return {"images_per_s": train_images / statistics.mean(steady), "epoch_s": timer.epoch_times}


@torch.inference_mode()
def bench_inference(net_cfg: dict, device: torch.device, args) -> dict:
    """(e) Batched throughput and single-image latency (median) in eval mode."""
    net = build_model(**net_cfg).to(device).eval()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    forward = torch.compile(net) if args.compile else net
    batch = torch.rand(args.batch_size, 1, args.image_size, args.image_size, device=device)
    single = batch[:1]
    latencies, batch_times = [], []
    for i in range(args.warmup + args.steps):
        with _autocast(device, args.precision):
            _sync(device)
            start = time.perf_counter()
            forward(batch)
            _sync(device)
            middle = time.perf_counter()
            forward(single)
            _sync(device)
        if i >= args.warmup:
            batch_times.append(middle - start)
            latencies.append(time.perf_counter() - middle)
    return {
        "images_per_s": args.batch_size / statistics.median(batch_times),
        "latency_ms": 1000 * statistics.median(latencies),
    }


def default_per_class(device: torch.device) -> int:
    """Synthetic set size for (c) and (d): at 30 per class a train epoch is 3 batches, which a GPU runs
    so fast that (c) and (d) would time epoch boundaries rather than throughput."""
    return 300 if device.type == "cuda" else 30


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    args.per_class = args.per_class or default_per_class(device)
    net_cfg = {"arch": args.arch, "encoder_name": args.encoder, "decoder_channels": args.decoder_channels}
    flops = model_flops(build_model(**net_cfg).to(device), args.image_size, device)
    data = RandomBatches(args.warmup + args.steps, args.batch_size, args.image_size)
    results: dict = {"config": vars(args), "device": str(device), "machine": _machine(device)}
    results["flops_forward_per_image"] = flops
    results["raw"] = {"images_per_s": bench_raw(net_cfg, data, device, args)}
    results["raw"]["tflops_achieved"] = results["raw"]["images_per_s"] * 3 * flops / 1e12  # fwd + 2x bwd
    results["lightning"] = {"images_per_s": bench_lightning(net_cfg, data, device, args)}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_busi(Path(tmp) / "busi", per_class=args.per_class, seed=0)
        datamodule = BUSIDataModule(
            root=str(root),
            image_size=args.image_size,
            cache_dir=str(Path(tmp) / "cache"),
            batch_size=args.batch_size,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=True,
            val_fraction=0.2,  # only the train split is used; 5 parts keep tiny sets splittable
            test_fraction=0.2,
        )
        datamodule.prepare_data()
        datamodule.setup("fit")
        results["dataloader"] = {
            **bench_dataloader(datamodule, args.steps),
            "workers": datamodule.num_workers,
        }
        results["epoch"] = bench_epoch(net_cfg, datamodule, device, args)
    results["inference"] = bench_inference(net_cfg, device, args)
    raw = results["raw"]["images_per_s"]
    results["ratios"] = {
        "lightning/raw (target >= 0.95)": results["lightning"]["images_per_s"] / raw,
        "dataloader/raw (target >= 3)": results["dataloader"]["images_per_s"] / raw,
        "epoch/raw (target >= 0.90)": results["epoch"]["images_per_s"] / raw,
    }
    return results


def _machine(device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }


def report(results: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"busi-mtl benchmark on {results['device']} ({results['config']['precision']})")
    table.add_column("measurement")
    table.add_column("images/s", justify="right")
    table.add_column("notes")
    table.add_row(
        "(a) raw PyTorch loop",
        f"{results['raw']['images_per_s']:.1f}",
        f"{results['raw']['tflops_achieved']:.3f} TFLOP/s achieved",
    )
    table.add_row(
        "(b) LightningModule + Trainer", f"{results['lightning']['images_per_s']:.1f}", "in-memory tensors"
    )
    dl = results["dataloader"]
    table.add_row(
        "(c) train DataLoader alone",
        f"{dl['images_per_s']:.1f}",
        f"{dl['workers']} workers, first batch {dl['first_batch_s']:.2f} s",
    )
    table.add_row(
        "(d) full training epoch",
        f"{results['epoch']['images_per_s']:.1f}",
        "synthetic BUSI, cached preprocessing",
    )
    inf = results["inference"]
    table.add_row(
        "(e) inference", f"{inf['images_per_s']:.1f}", f"latency {inf['latency_ms']:.1f} ms / image"
    )
    console.print(table)
    console.print(f"forward FLOPs per image: {results['flops_forward_per_image'] / 1e9:.2f} GFLOP")
    for name, value in results["ratios"].items():
        console.print(f"{name}: {value:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="busi-mtl training/inference benchmark")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "16-mixed", "bf16-mixed"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--workers", default="auto", help="DataLoader workers: a number or auto (as data.num_workers)"
    )
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--encoder", default="resnet34")
    parser.add_argument("--decoder-channels", type=int, nargs=5, default=[256, 128, 64, 32, 16])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs for (d); the first is not timed")
    parser.add_argument(
        "--per-class",
        type=int,
        default=None,
        help="synthetic images per class for (c) and (d) (default: 30 on CPU, 300 on a GPU)",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark/benchmark.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = run(args)
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    Console().print(f"written to {args.out}")
    return results


if __name__ == "__main__":
    main()
