"""`flashstep eval`: ShapesBench on any model and any prompt file (see shared/DESIGN.md).

For every prompt x seed the engine makes one image and the judge reads it. Real renders drawn
from the same prompts (attributes the prompt names fixed, the rest uniform, held-out pairs
allowed) give the reference for FD and for diversity. Images are generated in batches of equal
`batch_key`, exactly as the server would batch them, and wall time covers generation only.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flashstep.models.outputs import GenerationRequest
from flashstep.training import metrics
from flashstep.training.judge import Judge
from flashstep.training.prompts import PromptSpec, load_prompts
from flashstep.training.shapes import ATTRIBUTES, is_held_out, parse_prompt, render_seed

REFERENCE_SEED = 50_000_000  # real renders for FD/diversity come from seeds far from training's
SEEDS_PER_PROMPT_RANGE = 1000  # prompt p's real renders take REFERENCE_SEED + p * 1000 + seed


@dataclass(frozen=True)
class EvalOptions:
    model: str
    prompts: Path
    seeds: int = 8
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1: a fresh range confirms a pick made on another
    models_root: Path | None = None
    family: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    nasa_alpha: float | None = None
    hybrid: bool = False
    batch_size: int = 32
    judge_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"`seeds` must be >= 1 but is {self.seeds}")
        if not 0 <= self.first_seed <= SEEDS_PER_PROMPT_RANGE - self.seeds:
            raise ValueError(
                f"`first_seed` must be in [0, {SEEDS_PER_PROMPT_RANGE - self.seeds}] (seeds {self.seeds}) but is {self.first_seed}"
            )


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> (N, 3, 64, 64) float in [-1, 1], the judge's input."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def judged_attributes(preds: dict[str, np.ndarray], i: int) -> dict[str, str]:
    return {name: ATTRIBUTES[name][int(preds[name][i])] for name in ATTRIBUTES}


def generate_all(engine, requests: list[GenerationRequest], batch_size: int) -> tuple[list, float, int]:
    """Images in request order, generation seconds, UNet evals per image (max over batches)."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    validated = [engine.validate(r) for r in requests]
    for i, r in enumerate(validated):
        groups[engine.batch_key(r)].append(i)
    images: list = [None] * len(requests)
    seconds, evals = 0.0, 0
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            chunk = idx[start : start + batch_size]
            t0 = time.perf_counter()
            result = engine.generate([validated[i] for i in chunk])
            seconds += time.perf_counter() - t0
            evals = max(evals, result.unet_evals)
            for i, im in zip(chunk, result.images, strict=True):
                images[i] = im
    return images, seconds, evals


def reference_renders(specs: list[PromptSpec], seeds: range) -> torch.Tensor:
    """Real renders for each prompt x seed: named attributes fixed, the rest uniform."""
    arrays = []
    for p, spec in enumerate(specs):
        named = parse_prompt(spec.prompt)
        for s in seeds:
            arrays.append(render_seed(REFERENCE_SEED + p * SEEDS_PER_PROMPT_RANGE + s, named, allow_held_out=True)[1])
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def evaluate_model(opts: EvalOptions, engine=None) -> dict:
    """Run ShapesBench and return the report (every key documented in the README)."""
    from flashstep.models.engine import load_engine

    specs = load_prompts(opts.prompts)
    if engine is None:
        engine = load_engine(opts.model, opts.models_root, family=opts.family)
    judge = Judge.load(opts.judge_dir) if opts.judge_dir else Judge.load()

    def request(spec: PromptSpec, seed: int, negative: bool) -> GenerationRequest:
        return GenerationRequest(
            prompt=spec.prompt,
            seed=seed,
            negative_prompt=spec.negative_prompt if negative else None,
            num_inference_steps=opts.steps,
            guidance_scale=opts.guidance_scale,
            nasa_alpha=opts.nasa_alpha,
            hybrid=opts.hybrid,
        )

    seeds = range(opts.first_seed, opts.first_seed + opts.seeds)
    positives = [s for s in specs if not s.negative_prompt]
    negatives = [s for s in specs if s.negative_prompt]
    requests = [request(s, seed, True) for s in positives for seed in seeds]
    neg_requests = [request(s, seed, True) for s in negatives for seed in seeds]
    neg_baseline = [request(s, seed, False) for s in negatives for seed in seeds]
    images, seconds, evals = generate_all(engine, requests + neg_requests + neg_baseline, opts.batch_size)

    feats, preds = judge.read(images_to_tensor(images))
    judged = [judged_attributes(preds, i) for i in range(len(images))]
    n_pos, n_neg = len(requests), len(neg_requests)
    resolved = engine.validate((requests or neg_requests)[0])  # the defaults the model filled in
    report: dict = {
        "model": engine.name,
        "family": engine.family,
        "prompts": str(opts.prompts),
        "n_prompts": len(specs),
        "seeds_per_prompt": opts.seeds,
        "first_seed": opts.first_seed,
        "n_images": len(images),
        "steps": resolved.num_inference_steps,
        "guidance_scale": resolved.guidance_scale,
        "hybrid": opts.hybrid,
        "unet_evals_per_image": evals,
        "seconds_per_image": seconds / max(1, len(images)),
        "adherence": None,
        "adherence_heldout": None,
        "fd": None,
        "diversity": None,
    }

    if positives:
        named = [parse_prompt(r.prompt) for r in requests]
        heldout = [is_held_out(n.get("shape", ""), n.get("color", "")) for n in named]
        seen_idx = [i for i, h in enumerate(heldout) if not h]
        held_idx = [i for i, h in enumerate(heldout) if h]
        report["adherence"] = metrics.adherence([named[i] for i in seen_idx], [judged[i] for i in seen_idx])
        report["adherence_heldout"] = metrics.adherence([named[i] for i in held_idx], [judged[i] for i in held_idx])
        report["attribute_accuracy"] = metrics.attribute_accuracy(named, judged[:n_pos])
        report["confusions"] = metrics.confusions(named, judged[:n_pos])

        ref = reference_renders(positives, seeds)
        ref_feats, ref_preds = judge.read(ref)
        report["fd"] = metrics.frechet_distance(feats[:n_pos], ref_feats)
        scores = []
        for p, spec in enumerate(positives):
            left_out = [a for a in ATTRIBUTES if a not in parse_prompt(spec.prompt)]
            rows = range(p * opts.seeds, (p + 1) * opts.seeds)
            for attr in left_out:
                score = metrics.normalised_entropy(
                    [judged[i][attr] for i in rows], [ATTRIBUTES[attr][int(ref_preds[attr][i])] for i in rows]
                )
                if score is not None:
                    scores.append(score)
        report["diversity"] = float(np.mean(scores)) if scores and opts.seeds > 1 else None
        report["diversity_pairs"] = len(scores)

    if negatives:
        neg_named = [parse_prompt(r.negative_prompt or "") for r in neg_requests]
        pos_named = [parse_prompt(r.prompt) for r in neg_requests]
        with_neg = judged[n_pos : n_pos + n_neg]
        without = judged[n_pos + n_neg :]
        report["negative_efficacy"] = metrics.negative_efficacy(neg_named, with_neg)
        report["negative_efficacy_without_negative"] = metrics.negative_efficacy(neg_named, without)
        report["negative_adherence"] = metrics.adherence(pos_named, with_neg)
        report["negative_adherence_without_negative"] = metrics.adherence(pos_named, without)
    return report


def print_report(report: dict) -> None:
    keys = [
        "model", "family", "steps", "guidance_scale", "hybrid", "n_images", "seeds_per_prompt", "first_seed",
        "adherence", "adherence_heldout", "fd", "diversity", "negative_efficacy",
        "negative_efficacy_without_negative", "negative_adherence",
        "negative_adherence_without_negative", "unet_evals_per_image", "seconds_per_image",
    ]  # fmt: skip
    width = max(len(k) for k in keys)
    for key in keys:
        if key in report:
            value = report[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"{key:<{width}}  {text}")
    if report.get("attribute_accuracy"):
        per = ", ".join(f"{k} {v:.3f}" for k, v in report["attribute_accuracy"].items())
        print(f"{'attribute_accuracy':<{width}}  {per}")
    for attr, misses in (report.get("confusions") or {}).items():
        text = ", ".join(f"{a} as {b} {c}" for a, b, c in misses)
        print(f"{'misses: ' + attr:<{width}}  {text}")
    print(f"(diversity over {report.get('diversity_pairs', 0)} prompt x left-out-attribute pairs, "
          f"{report['seeds_per_prompt']} seeds each)")
