"""Model-library subcommands of ``micronet``: ``models``, ``profile`` and ``convert``."""

from __future__ import annotations

import argparse
import json

from .profiler import run_profile


def run_models(args: argparse.Namespace) -> int:
    """Print every model with its parameters, MAdds at 224 and what it is."""
    from .profiler import profile_model
    from .registry import create_model, list_models, resolve_name

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


def run_convert(args: argparse.Namespace) -> int:
    """Read any supported checkpoint, load it strictly into its model, write a clean .safetensors."""
    from .registry import create_model
    from .weights import checkpoint_metadata, guess_model, read_state_dict, save_safetensors

    name = args.model
    if name is None:
        meta = checkpoint_metadata(args.input)
        name = meta.get("model_name") or meta.get("model") or guess_model(read_state_dict(args.input))
        if name is None:
            raise ValueError(f"{args.input}: cannot tell which model this is; pass --model NAME")
    model = create_model(name, pretrained=args.input, num_classes=args.num_classes)
    out = save_safetensors(model, args.output, model.spec.name)
    print(f"wrote {out} ({model.spec.name}, {model.num_classes} classes)")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the models with parameters and MAdds")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--json", action="store_true", help="print one JSON list")
    p.set_defaults(func=run_models)

    p = sub.add_parser("profile", help="parameters and MAdds by the paper's rule, per part and per layer")
    p.add_argument("model", help="model name, e.g. micronet_m3")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--summary", action="store_true", help="totals and parts only, no per-layer table")
    p.add_argument("--json", action="store_true", help="print one JSON object (model, params, madds, parts, layers)")
    p.set_defaults(func=run_profile)

    p = sub.add_parser("convert", help="convert a published / PaddleClas / own checkpoint to .safetensors")
    p.add_argument("input", help="checkpoint: .pth/.pth.tar/.pt, .pdparams or .safetensors")
    p.add_argument("output", help="the .safetensors file to write")
    p.add_argument("--model", default=None, help="model name (default: read from the file or guessed)")
    p.add_argument("--num-classes", type=int, default=None, help="class count (default: the file's)")
    p.set_defaults(func=run_convert)
