"""`flashstep generate PROMPT`: images from one model, written to files."""

from __future__ import annotations

import argparse
from pathlib import Path

from flashstep.cli.options import add_model_options


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate an image from a prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="image file; with -n > 1, one file per image (-0, -1, ...)")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=int, default=0, help="noise seed of the first image; image i takes seed + i")
    g.add_argument("-n", "--num-images", type=int, default=1)
    add_model_options(g)
    g.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flashstep.models.engine import load_engine
    from flashstep.models.outputs import GenerationRequest

    engine = load_engine(args.model, args.models_root, family=args.family)
    requests = [
        GenerationRequest(
            prompt=args.prompt,
            seed=args.seed + i,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            nasa_alpha=args.nasa_alpha,
            hybrid=args.hybrid,
            tiny_decoder=args.tiny_decoder,
        )
        for i in range(args.num_images)
    ]
    result = engine.generate(requests)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        paths.append(str(path))
    t = result.timings
    print(
        f"{engine.name} ({engine.family}) wrote {', '.join(paths)}: {result.unet_evals} UNet evals/image, "
        f"encode {t.encode:.3f}s denoise {t.denoise:.3f}s decode {t.decode:.3f}s"
    )
    return 0
