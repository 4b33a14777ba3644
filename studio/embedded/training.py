"""Training loop shared by every stage: seeded batches, resumable checkpoints, EMA, logged losses.

Each step's batch and noise come from `(seed, step)` alone, so a stage resumed from a checkpoint continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

SEED = 20261123


@dataclass
class StageResult:
    name: str
    steps: int
    seconds: float
    final_loss: float
    checks: dict


class Stage:
    """One model of the family. Subclasses build the model, compute a loss for a step, and export weights."""

    name = "stage"
    lr = 1e-3
    warmup = 100
    ema_decay: float | None = None
    save_every = 250

    def __init__(self, run_dir: Path, models_dir: Path, steps: int, batch_size: int):
        self.run_dir = Path(run_dir) / self.name
        self.models_dir = Path(models_dir)
        self.steps = steps
        self.batch_size = batch_size

    # --- to implement ---
    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def prepare(self) -> None:
        """Anything the steps need that is computed once (e.g. encoded latents), cached in run_dir."""

    def loss(self, model: torch.nn.Module, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def export(self, model: torch.nn.Module) -> dict:
        """Write the final weights; return the checks made on them (they go into the stage's record)."""
        raise NotImplementedError

    # --- the loop ---
    @property
    def done_file(self) -> Path:
        return self.run_dir / "done.json"

    def result(self) -> StageResult | None:
        if not self.done_file.exists():
            return None
        return StageResult(**json.loads(self.done_file.read_text()))

    def learning_rate(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))  # cosine down to 10%

    def run(self, seed: int = SEED) -> StageResult:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        model = self.build()
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)
        ema = copy.deepcopy(model).requires_grad_(False) if self.ema_decay else None
        start, seconds = self._resume(model, optimizer, ema)
        self.prepare()
        log = open(self.run_dir / "losses.csv", "a", newline="")
        writer = csv.writer(log)
        bar = tqdm(range(start, self.steps), initial=start, total=self.steps, desc=self.name, dynamic_ncols=True)
        began, smooth = time.monotonic(), None
        model.train()
        for step in bar:
            rng = random.Random(seed * 1_000_003 + step)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate(step)
            loss = self.loss(model, rng, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if ema is not None:
                self._update_ema(ema, model, step)
            value = loss.item()
            smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
            writer.writerow([step, f"{value:.6f}"])
            bar.set_postfix(loss=f"{smooth:.4f}")
            if (step + 1) % self.save_every == 0 or step + 1 == self.steps:
                log.flush()
                self._save(model, optimizer, ema, step + 1, seconds + time.monotonic() - began)
        log.close()
        seconds += time.monotonic() - began
        final = ema if ema is not None else model
        final.eval()
        export_began = time.monotonic()
        checks = self.export(final)
        seconds += time.monotonic() - export_began
        result = StageResult(self.name, self.steps, round(seconds, 1), round(smooth or float("nan"), 5), checks)
        self.done_file.write_text(json.dumps(result.__dict__, indent=2))
        return result

    def forget(self) -> None:
        """Drop the finished run (its record, checkpoint and losses; a cached dataset stays), to train it again."""
        for name in ("done.json", "checkpoint.pt", "losses.csv"):
            (self.run_dir / name).unlink(missing_ok=True)

    def trained_model(self) -> torch.nn.Module:
        """The stage's final (EMA) model from its last checkpoint, for the stages that build on it."""
        model = self.build()
        state = torch.load(self.run_dir / "checkpoint.pt", weights_only=False)
        model.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        return model.eval().requires_grad_(False)

    def _update_ema(self, ema, model, step: int) -> None:
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for target, source in zip(ema.parameters(), model.parameters()):
                target.lerp_(source, 1 - decay)
            for target, source in zip(ema.buffers(), model.buffers()):
                target.copy_(source)

    def _save(self, model, optimizer, ema, step: int, seconds: float) -> None:
        state = {
            "step": step,
            "seconds": seconds,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
        }
        temporary = self.run_dir / "checkpoint.pt.tmp"
        torch.save(state, temporary)
        temporary.replace(self.run_dir / "checkpoint.pt")  # never leave a half-written checkpoint

    def _resume(self, model, optimizer, ema) -> tuple[int, float]:
        path = self.run_dir / "checkpoint.pt"
        if not path.exists():
            (self.run_dir / "losses.csv").unlink(missing_ok=True)
            return 0, 0.0
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        print(f"{self.name}: resuming at step {state['step']} of {self.steps}")
        self._truncate_log(state["step"])
        return state["step"], state["seconds"]

    def _truncate_log(self, step: int) -> None:
        path = self.run_dir / "losses.csv"
        if path.exists():
            rows = [row for row in csv.reader(path.open()) if row and int(row[0]) < step]
            with path.open("w", newline="") as file:
                csv.writer(file).writerows(rows)
