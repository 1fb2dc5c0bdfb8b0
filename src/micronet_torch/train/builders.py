"""The pieces a training run is made of, each built by one function from the resolved config.

``Trainer`` calls them in order: model, EMA, optimiser and schedule, mixed precision, the distributed /
compiled wrapper, loss, batch augmentation, TensorBoard. Optimiser, schedule, EMA, mixup and random erasing
come from timm; DistributedDataParallel from PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from .._env import available_cores, default_workers
from .._text import one_line
from ..models import CheckpointError, build_model, read_state_dict
from ..models.weights import CLASSIFIER_PREFIX
from ..ops import set_shift_max_impl
from .checkpoint import clean_state_dict
from .config import TrainConfig, TrainingError, data_config
from .distributed import DistEnv
from .run_log import open_tensorboard


def build_train_model(cfg: TrainConfig, num_classes: int, env: DistEnv, state: dict[str, Any] | None) -> nn.Module:
    """The model on its device: from ``--pretrained`` (new runs) or the resumed state; SyncBN under torchrun."""
    pretrained = cfg.pretrained if state is None else None
    extra = dict(cfg.model_kwargs or {})
    if cfg.drop_rate is not None:
        extra["drop_rate"] = cfg.drop_rate
    model = build_model(cfg.model, pretrained=pretrained, num_classes=num_classes, in_chans=cfg.in_chans, **extra)
    if pretrained and env.is_main and not cfg.quiet:
        print(fine_tune_report(model, str(pretrained)), flush=True)
    if cfg.qat:
        return _qat_model(cfg, model, env, state)
    if state is not None:
        load_resumed(model, state["model"], "model")
    set_shift_max_impl(model, cfg.dsm)  # the fused kernels by default ("auto"); no effect on the state dict
    if cfg.sync_bn and env.distributed:
        if env.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif env.is_main:
            print("note: --sync-bn needs CUDA (PyTorch's SyncBatchNorm); each CPU process keeps its own BatchNorm")
    model.to(env.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _qat_model(cfg: TrainConfig, model: nn.Module, env: DistEnv, state: dict[str, Any] | None) -> nn.Module:
    """``--qat``: the float model's int8 microcontroller graph with fake quantization (``deploy.qat``); the float
    weights it started from ride along (``source_state``) into every checkpoint."""
    from ..deploy.qat import qat_net  # the deploy compiler: only --qat runs need it at start-up

    if state is not None:
        if not isinstance(state.get("float_model"), dict):
            raise TrainingError("--resume: this --qat checkpoint lacks the float model it started from")
        load_resumed(model, state["float_model"], "float model")
    source = clean_state_dict(model.state_dict())
    dcfg = data_config(cfg)  # the stem folds the normalization of the images it trains on, as the int8 file does
    qnet = qat_net(model, cfg.img_size, cfg.in_chans, (tuple(dcfg.mean), tuple(dcfg.std)))
    if state is not None:
        load_resumed(qnet, state["model"], "QAT model")
    qnet.source_state = source
    return qnet.to(env.device)


def fine_tune_report(model: nn.Module, pretrained: str) -> str:
    """One line for the log: how many of the model's tensors came from ``pretrained``, and whether the head was
    replaced (new, randomly initialised classifier for a different number of classes)."""
    ours = model.state_dict()
    try:
        theirs = read_state_dict(pretrained) if Path(pretrained).is_file() else {}
    except (CheckpointError, OSError, ValueError):
        theirs = {}
    if not theirs:
        return f"fine-tuning from {pretrained}"
    loaded = [k for k, v in ours.items() if k in theirs and tuple(theirs[k].shape) == tuple(v.shape)]
    head = [k for k in ours if k.startswith(CLASSIFIER_PREFIX) and k not in loaded]
    line = f"fine-tuning from {pretrained}: loaded {len(loaded)} of the model's {len(ours)} weight tensors"
    if head:
        old = theirs.get(CLASSIFIER_PREFIX + "linear.0.weight")
        new = ours.get(CLASSIFIER_PREFIX + "linear.0.weight")
        sizes = f" ({old.shape[0]} -> {new.shape[0]} classes)" if old is not None and new is not None else ""
        line += f"; the classifier head was replaced{sizes}, {len(head)} tensors newly initialised"
    return line


def build_ema(cfg: TrainConfig, model: nn.Module, state: dict[str, Any] | None) -> Any:
    """timm's ``ModelEmaV3`` of the weights when ``--ema``, restored from the resumed state."""
    if not cfg.ema:
        return None
    from timm.utils import ModelEmaV3  # timm.utils pulls in extra modules: only with --ema

    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    if state is not None and state.get("ema") is not None:
        load_resumed(ema.module, state["ema"], "EMA")
    return ema


def load_resumed(module: nn.Module, sd: Any, what: str) -> None:
    """Load a resumed checkpoint's ``what`` weights; weights that do not fit are a ``TrainingError``, one line."""
    try:
        module.load_state_dict(sd)
    except (AttributeError, TypeError, RuntimeError) as err:
        raise TrainingError(
            f"--resume: the checkpoint's {what} weights do not fit the model it names ({one_line(err, 300)})"
        ) from err


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Any timm optimiser; weight decay on biases and norms too when the recipe says so (``wd_all``)."""
    return create_optimizer_v2(
        model,
        opt=cfg.opt,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        filter_bias_and_bn=not cfg.wd_all,
    )


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> CosineLRScheduler:
    """Cosine decay per iteration over the whole run, after a linear warm-up."""
    return CosineLRScheduler(
        optimizer,
        t_initial=cfg.epochs * steps_per_epoch,
        lr_min=cfg.min_lr,
        warmup_t=round(cfg.warmup_epochs * steps_per_epoch),
        warmup_lr_init=cfg.warmup_lr,
        warmup_prefix=False,
        t_in_epochs=False,
    )


def build_amp(cfg: TrainConfig, env: DistEnv) -> tuple[torch.dtype, torch.amp.GradScaler]:
    """Mixed precision: float16 with a gradient scaler on CUDA, bfloat16 (no scaler) on the CPU."""
    use_fp16 = cfg.amp and env.device.type == "cuda"
    return (torch.float16 if use_fp16 else torch.bfloat16), torch.amp.GradScaler(env.device.type, enabled=use_fp16)


def wrap_model(cfg: TrainConfig, model: nn.Module, env: DistEnv) -> nn.Module:
    """The module the loop calls: DistributedDataParallel under torchrun, ``torch.compile`` when asked."""
    forward_model = model
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP  # only under torchrun

        ids = [env.device.index] if env.device.type == "cuda" else None
        forward_model = DDP(model, device_ids=ids)
    if cfg.compile:
        forward_model = torch.compile(forward_model)
    return forward_model


def build_loss(cfg: TrainConfig) -> nn.Module:
    """Training loss: soft-target CE under mixup/cutmix, else CE with label smoothing."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def build_augmentation(cfg: TrainConfig, env: DistEnv, num_classes: int) -> tuple[Any, Any]:
    """Batch augmentation on the device: timm's random erasing and mixup / cutmix, each None when off."""
    erasing = mixup = None
    if cfg.reprob > 0:
        from timm.data.random_erasing import RandomErasing

        # after normalization, so erased pixels are N(0, 1) noise like the rest of the batch's statistics
        erasing = RandomErasing(probability=cfg.reprob, mode="pixel", device=str(env.device))
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup = Mixup(
            mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=num_classes
        )
    return erasing, mixup


def build_writer(out: Path, env: DistEnv) -> Any:
    """TensorBoard events under ``out/tensorboard`` (rank 0 only; ``run_log.open_tensorboard``)."""
    return open_tensorboard(out) if env.is_main else None


def loader_workers(cfg: TrainConfig, env: DistEnv) -> int:
    """DataLoader workers per process: ``--workers``, else the spare cores shared by this node's processes."""
    if cfg.workers is not None:
        return cfg.workers
    return max(1, default_workers() // env.local_world) if available_cores() > 2 else 1
