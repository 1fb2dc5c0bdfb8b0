"""``micronet train`` and ``python -m micronet_torch.train`` (what torchrun launches): argument parsing only.

Flags left out take the recipe's value (``--recipe default`` for small data, ``--recipe paper`` for
the published ImageNet recipe); the training itself is ``train.train``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from .._text import MESSAGE_LIMIT, one_line
from ..train.recipes import RECIPES
from .common import nonnegative_int, positive_int, user_errors

if TYPE_CHECKING:
    from ..train import TrainConfig

# torch, the model library and the training loop are imported inside the functions that run a command, not
# here: ``micronet --help`` and ``micronet train --help`` build this parser without loading them


def _float_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected two numbers like 0.08,1.0, got {text!r}") from err
    return lo, hi


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The training flags (shared by ``micronet train`` and ``micronet demo``)."""
    g = p.add_argument_group("what to train")
    # no argparse defaults (None: not typed), so that --resume tells a flag typed at its default from one left out
    g.add_argument("--model", help="model name (see micronet models) [micronet_m0]")
    g.add_argument(
        "--data",
        help="fashion-mnist, cifar10, cifar100, or a folder with train/ and val/ class subfolders [fashion-mnist]",
    )
    g.add_argument("--data-root", help="where built-in datasets live / are unpacked [$MICRONET_TORCH_HOME/data]")
    g.add_argument("--download", action="store_true", help="allow downloading CIFAR (never done otherwise)")
    g.add_argument("--output", "-o", help="run folder for checkpoints, metrics, logs [runs/<model>]")
    g.add_argument("--pretrained", metavar="PATH", help="start from these weights (head replaced if classes differ)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="PATH",
        help="continue OUTPUT/last.pt (or PATH); --epochs may grow (the cosine is re-stretched), the optimiser's "
        "settings may not (docs/training.md)",
    )
    g.add_argument("--overwrite", action="store_true", help="start a new run in an OUTPUT that holds one")
    r = p.add_argument_group("recipe (unset flags take the recipe's value)")
    r.add_argument(
        "--recipe", choices=tuple(RECIPES), default=None, help="default: small data; paper: ImageNet; qat: --qat's"
    )
    r.add_argument("--epochs", type=int)
    r.add_argument("--batch-size", "-b", type=int, help="global batch size (split over torchrun processes)")
    r.add_argument("--lr", type=float, help="peak learning rate at this batch size")
    r.add_argument("--min-lr", type=float)
    r.add_argument("--warmup-epochs", type=float)
    r.add_argument("--opt", help="any timm optimizer: adamw, momentum (SGD+momentum), sgd (Nesterov), lamb, ...")
    r.add_argument("--momentum", type=float)
    r.add_argument("--weight-decay", "--wd", type=float)
    r.add_argument("--label-smoothing", type=float)
    r.add_argument("--mixup", type=float, help="mixup alpha (timm Mixup) [0: off]")
    r.add_argument("--cutmix", type=float, help="cutmix alpha [0: off]")
    r.add_argument("--reprob", type=float, help="random erasing probability per image (timm RandomErasing) [0: off]")
    r.add_argument("--clip-grad", type=float, help="clip the gradient norm")
    r.add_argument("--drop-rate", type=float, help="head dropout [the model's]")
    r.add_argument("--img-size", type=int, help="input size; <= 64 uses the small-image pipeline")
    r.add_argument("--in-chans", type=int, choices=(1, 3), help="model input channels (grey data feeds either) [3]")
    r.add_argument(
        "--hflip",
        type=float,
        help="horizontal flip probability [0.5; 0 for folders of small images (<= 64 px), whose classes may be "
        "digits or letters]",
    )
    r.add_argument(
        "--pad",
        type=int,
        help="small images: random translation in px [img_size/16 (default recipe), img_size/8 (paper)]",
    )
    r.add_argument("--scale", type=_float_pair, help="RandomResizedCrop area range, e.g. 0.08,1")
    r.add_argument("--crop-pct", type=float, help="eval centre crop fraction (crop policy) [0.875]")
    r.add_argument("--seed", type=int, help="[0]")
    x = p.add_argument_group("execution")
    x.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps [auto]")
    x.add_argument("--amp", action="store_true", default=None, help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    x.add_argument("--ema", action="store_true", default=None, help="keep an EMA of the weights (timm ModelEmaV3)")
    x.add_argument("--ema-decay", type=float)
    x.add_argument("--channels-last", action="store_true", default=None)
    x.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    x.add_argument(
        "--max-image-pixels",
        type=int,
        help="refuse (or with --skip-bad-images skip) images with more pixels, a decompression-bomb guard; 0: no "
        "limit [PIL's, 89,478,485]",
    )
    x.add_argument(
        "--dsm",
        choices=("auto", "eager", "fused", "compile"),
        help="Dynamic Shift-Max implementation: fused C/Triton kernels (auto: where they run), eager, or "
        "torch.compile of the eager fusion [auto]",
    )
    x.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    x.add_argument("--workers", "-j", type=nonnegative_int, help="DataLoader worker processes")
    x.add_argument("--threads", type=positive_int, help="torch CPU threads per process [cores / processes]")
    x.add_argument("--eval-batch-size", type=positive_int)
    x.add_argument("--cache", choices=("auto", "memory", "none"), help="decode small-image folders into memory [auto]")
    x.add_argument("--skip-bad-images", action="store_true", default=None, help="skip unreadable images (counted)")
    x.add_argument("--log-interval", type=nonnegative_int, help="steps between plain log lines [every 30 s]")
    x.add_argument("--quiet", "-q", action="store_true", default=None)
    q = p.add_argument_group("quantization-aware training")
    q.add_argument(
        "--qat",
        action="store_true",
        default=None,
        help="fine-tune --pretrained's int8 microcontroller graph with int8 fake quantization (export it with "
        "--format tflm); the recipe becomes 'qat' (3 epochs, small rate) unless --recipe is given. Without "
        "--pretrained the float model is trained first (OUTPUT/float, the recipe and --epochs given), then "
        "fine-tuned with the 'qat' recipe",
    )


def given_settings(args: argparse.Namespace) -> set[str]:
    """The settings typed on the command line (a training flag not typed parses to None)."""
    from ..train import TrainConfig

    return {name for name in TrainConfig().to_dict() if getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed flags: flags not given keep ``None`` (the recipe's) or the default."""
    from ..models import resolve_name
    from ..train import TrainConfig

    cfg = TrainConfig()
    for name in given_settings(args):
        setattr(cfg, name, getattr(args, name))
    if cfg.qat and args.recipe is None:
        cfg.recipe = "qat"
    if not args.output:
        try:
            cfg.output = os.path.join("runs", resolve_name(cfg.model)[0].name)
        except ValueError:
            cfg.output = os.path.join("runs", cfg.model)
    return cfg


def run_train(args: argparse.Namespace) -> int:
    from ..train import Interrupted, train

    cfg = config_from_args(args)
    try:
        summary = train(cfg, resume=args.resume, overwrite=args.overwrite, given=given_settings(args))
    except Interrupted as stop:
        return 128 + stop.signum
    if summary:
        print(
            f"done: {summary['epochs_completed']} epochs, best top-1 {summary['best_top1']:.2f} "
            f"(epoch {summary['best_epoch']}), final top-1 {summary['final_top1']:.2f}; "
            f"results in {summary['output']}/ (best.pt, last.pt, summary.json, metrics.csv, curves.png, tensorboard/)"
        )
    return 0


def register_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a model (one CPU to many GPUs under torchrun)",
        description="Train a MicroNet. Under torchrun --nproc_per_node N it runs DistributedDataParallel.",
    )
    add_train_args(p)
    p.set_defaults(func=run_train)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m micronet_torch.train`` (and of each torchrun process)."""
    parser = argparse.ArgumentParser(prog="micronet train", description="Train a MicroNet (torchrun-ready).")
    add_train_args(parser)
    args = parser.parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    try:
        return run_train(args)
    except user_errors() as err:
        where = f" (rank {rank})" if world > 1 else ""
        print(f"micronet train: error{where}: {one_line(err, MESSAGE_LIMIT)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("micronet train: interrupted", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
