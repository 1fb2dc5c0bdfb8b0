"""The model library's subcommands: ``micronet models``, ``profile`` and ``convert``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import CLIError, positive_int

# the model library (torch, timm) is imported inside each command: the parser is built without it


def run_models(args: argparse.Namespace) -> int:
    """Print every model with its parameters, MAdds at 224 and what it is."""
    from ..models import create_model, list_models, profile_model, resolve_name

    rows = []
    for name in list_models():
        spec, note = resolve_name(name)
        prof = profile_model(create_model(spec.name), img_size=args.img_size)
        rows.append(
            dict(name=name, model=spec.name, params=prof.params, madds=prof.madds, about=note or spec.description)
        )
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<16} {'params':>10} {'MAdds@' + str(args.img_size):>11}  about")
    for row in rows:
        print(f"{row['name']:<16} {row['params']:>10,} {row['madds'] / 1e6:>10.2f}M  {row['about']}")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    """Parameters and MAdds by the paper's rule, per part and per layer."""
    from ..models import create_model, format_profile, profile_model

    model = create_model(args.model, num_classes=args.num_classes, in_chans=args.in_chans)
    prof = profile_model(model, img_size=args.img_size)
    print(json.dumps(prof.to_dict()) if args.json else format_profile(prof, per_layer=not args.summary))
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Read any supported checkpoint, load it strictly into its model, write a clean .safetensors.

    The output keeps what evaluating the weights needs besides them (input size, preprocessing, class
    names, model arguments) in its metadata, so ``eval`` / ``predict`` of it match the original file.
    """
    from ..models import load_model, save_safetensors

    out_path = Path(args.output)
    if out_path.suffix != ".safetensors":
        raise CLIError(f"{args.output}: convert writes .safetensors files; name the output <name>.safetensors")
    loaded = load_model(args.input, args.model, num_classes=args.num_classes)
    model = loaded.model
    if not hasattr(model, "spec"):
        raise CLIError(f"{args.input}: holds a {loaded.name}; only MicroNets convert to .safetensors")
    out = save_safetensors(
        model,
        out_path,
        model.spec.name,
        data_config=loaded.data_config.to_dict(),
        class_names=loaded.class_names,
        model_kwargs=loaded.model_kwargs,
    )
    print(f"wrote {out} ({model.spec.name}, {model.num_classes} classes, {loaded.data_config.img_size} px)")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models with parameters and MAdds")
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=run_models)

    p = sub.add_parser("profile", help="parameters and MAdds by the paper's rule, per part and per layer")
    p.add_argument("model", help="model name, e.g. micronet_m3")
    p.add_argument("--img-size", type=positive_int, default=224)
    p.add_argument("--num-classes", type=positive_int, default=1000)
    p.add_argument("--in-chans", type=positive_int, default=3)
    p.add_argument("--summary", action="store_true", help="totals and parts only, no per-layer table")
    p.add_argument("--json", action="store_true", help="print one JSON object (model, params, madds, parts, layers)")
    p.set_defaults(func=run_profile)

    p = sub.add_parser("convert", help="convert a published / PaddleClas / own checkpoint to .safetensors")
    p.add_argument("input", help="checkpoint: .pth/.pth.tar/.pt, .pdparams or .safetensors")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--model", default=None, help="model name (default: read from the file or guessed)")
    p.add_argument("--num-classes", type=positive_int, default=None, help="class count (default: the file's)")
    p.set_defaults(func=run_convert)
