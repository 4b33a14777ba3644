"""How the embedded family is trained: stage order, steps and batch sizes, folders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from studio.embedded.stages import ClipStage, InpaintStage, MultiSizeStage, UnetStage, UpscalerStage, VaeStage
from studio.embedded.training import StageResult

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "models"
RUN_DIR = ROOT / "runs" / "embedded"
VAE_ORACLE_BAR = 0.99


@dataclass(frozen=True)
class StagePlan:
    steps: int
    batch_size: int
    dataset_size: int | None = None  # for the UNet stages, which pre-encode their latents
    check_images: int | None = None  # for the VAE: how many images its oracle check reads back (default 500)


# Sized so the whole family trains in under two hours on a 2-core CPU (docs/embedded-model.md gives the measured times).
TRAINING_PLAN = {
    "clip": StagePlan(2400, 128),
    "vae": StagePlan(4500, 32),
    "unet": StagePlan(5000, 64, dataset_size=24000),
    "multisize": StagePlan(1500, 64, dataset_size=4000),
    "inpaint": StagePlan(6000, 64, dataset_size=16000),
    "upscaler": StagePlan(7000, 16),
}
SMOKE_PLAN = {
    "clip": StagePlan(3, 8),
    "vae": StagePlan(3, 4, check_images=64),  # the check's code runs; its figures mean nothing after 3 steps
    "unet": StagePlan(3, 4, dataset_size=16),
    "multisize": StagePlan(3, 4, dataset_size=16),
    "inpaint": StagePlan(3, 4, dataset_size=16),
    "upscaler": StagePlan(3, 2),
}


def trained_before_its_base(stage) -> bool:
    """A stage that starts from another's weights (the multisize and inpainting UNets from the UNet) and finished
    before that one last did."""
    base = getattr(stage, "unet_stage", None)
    return bool(base and base.result() and base.done_file.stat().st_mtime > stage.done_file.stat().st_mtime)


class VaeNotGoodEnough(RuntimeError):
    pass


def make_stages(run_dir: Path, models_dir: Path, plan: dict[str, StagePlan]) -> dict:
    def args(name):
        return dict(run_dir=run_dir, models_dir=models_dir, steps=plan[name].steps, batch_size=plan[name].batch_size)

    clip = ClipStage(**args("clip"))
    vae = VaeStage(**args("vae"))
    unet = UnetStage(**args("unet"), clip=clip, vae=vae)
    multisize = MultiSizeStage(**args("multisize"), unet=unet)
    inpaint = InpaintStage(**args("inpaint"), unet=unet)
    for stage in (unet, multisize, inpaint):
        stage.dataset_size = plan[stage.name].dataset_size
    vae.check_images = plan["vae"].check_images or vae.check_images
    return {"clip": clip, "vae": vae, "unet": unet, "multisize": multisize, "inpaint": inpaint,
            "upscaler": UpscalerStage(**args("upscaler"))}


def train(run_dir, models_dir, plan=TRAINING_PLAN, only: list[str] | None = None, check_vae: bool = True) -> list[StageResult]:
    """Run the stages in order; finished stages are skipped, interrupted ones resume from their checkpoint."""
    stages = make_stages(Path(run_dir), Path(models_dir), plan)
    results = []
    for name, stage in stages.items():
        if only and name not in only:
            continue
        if stage.result() and trained_before_its_base(stage):
            stage.forget()  # its base was retrained since: it starts again from the new one
        result = stage.result() or stage.run()
        results.append(result)
        if name == "vae" and check_vae and plan is TRAINING_PLAN:
            failing = {k: v for k, v in result.checks.items() if k.startswith("vae_") and v < VAE_ORACLE_BAR}
            if failing:
                raise VaeNotGoodEnough(
                    f"The VAE loses what the oracle reads ({failing}, bar {VAE_ORACLE_BAR}); train it longer "
                    "before any UNet is trained on its latents."
                )
    return results
