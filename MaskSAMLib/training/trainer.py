"""The training loop: AdamW + poly schedule, AMP, clipping, accumulation, validation,
atomic checkpoints, exact resume, clean stops, and DDP (rank 0 writes).

Output folder (a model folder that ``masksam segment`` uses directly)::

    config.json, model.safetensors      best model by validation Dice (last if no validation)
    model_last.safetensors              the last weights
    training/base.safetensors           the starting weights (frozen parts come from here)
    training/checkpoint.pt              resume state (weights_only-loadable)
    training/settings.json              options, augmentation, loss / matching-cost weights
    training/split.json                 the run's training and validation case ids
    training/log.jsonl                  one JSON line per logged iteration / validation
    .masksam.lock                       held while a run writes here
    STOP                                create it to ask the run to stop cleanly
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.loader import Case, PatchSampler, batch_loader
from ..devices import decoder_chunk_for
from ..errors import Interrupted, MaskSAMError
from ..evaluation import dice_score
from ..files import atomic_path, write_safetensors
from ..inference.sliding_window import sliding_window_labels
from ..modeling.masksam import MaskSAM
from ..progress import Progress
from . import checkpoint as ckpt
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .settings import TrainConfig, TrainOptions

__all__ = ["STOP_FILE", "TrainConfig", "TrainOptions", "Trainer", "poly_lr"]

STOP_FILE = "STOP"


def poly_lr(base: float, iteration: int, total: int, power: float) -> float:
    return base * (1 - iteration / total) ** power


def _state_to_cpu(module: nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().cpu().contiguous()
        for k, v in module.state_dict().items()
        if names is None or k in names
    }


class Trainer:
    """Runs (or resumes) training of ``model`` into ``out_dir``.

    Args:
        model: the MaskSAM to train (already on ``device``); DDP-wrapped inside if distributed.
        train_cases / val_cases: preprocessed cases.
        options: :class:`TrainOptions` (validated when made).
        out_dir: the output model folder (locked by the caller).
        device: torch device.
        progress: progress reporter (only rank 0 reports).
        rank / world_size: DDP coordinates (0 / 1 when not distributed).
        settings: augmentation and loss / matching-cost weights (:class:`TrainConfig`; its
            ``options`` are replaced by ``options``); the defaults when None.
    """

    def __init__(
        self,
        *,
        model: MaskSAM,
        train_cases: list[Case],
        val_cases: list[Case],
        options: TrainOptions,
        out_dir: Path,
        device: torch.device,
        progress: Progress,
        amp_dtype: torch.dtype | None = None,
        rank: int = 0,
        world_size: int = 1,
        encoded: dict | None = None,
        val_encoded: dict | None = None,
        settings: TrainConfig | None = None,
    ) -> None:
        self.settings = (settings or TrainConfig()).with_options(options)
        self.model = model
        self.options = options
        # Queries per decoder pass, given to every forward (the shared model is not changed).
        self.decoder_chunk = decoder_chunk_for(device.type, options.decoder_chunk)
        self.out_dir = Path(out_dir)
        self.train_dir = self.out_dir / "training"
        self.device = device
        self.progress = progress
        self.amp_dtype = amp_dtype
        self.rank, self.world_size = rank, world_size
        self.val_cases = val_cases
        names = [lab.name for lab in model.config.labels]
        self.cached = model.caches_encoder
        self._val_encodings: dict[str, dict] = {}
        self._val_encoded = val_encoded or {}
        if self.cached:
            from .cases import default_cache_dir
            from .encoder_cache import CachedPatchSampler, encode_cases

            if encoded is None:  # the shared cache, never inside the model folder (GBs)
                encoded = encode_cases(model, train_cases, default_cache_dir())
            self.sampler = CachedPatchSampler(
                train_cases, encoded, num_slices=model.num_slices, size=model.img_size,
                batch_size=options.batch_size, seed=options.seed,
                mirror_slices=options.augment, item_offset=rank * options.batch_size,
            )
        else:
            self.sampler = PatchSampler(
                train_cases,
                num_slices=model.num_slices,
                size=model.img_size,
                batch_size=options.batch_size,
                seed=options.seed,
                augment=self.settings.augment,
                class_names=names,
                item_offset=rank * options.batch_size,
            )
        self.criterion = SetCriterion(
            num_classes=model.num_classes, matcher=HungarianMatcher(costs=self.settings.matching),
            num_points=options.num_points, weights=self.settings.loss,
        ).to(device)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=options.lr, eps=options.eps, weight_decay=options.weight_decay
        )
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda"
        )
        self.iteration = 0
        self.best = {"dice": -1.0, "iteration": -1}
        self.history: list[dict[str, Any]] = []
        self._stop_reason: str | None = None
        self._started = time.monotonic()
        self.net: nn.Module = model
        if world_size > 1:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "iteration": self.iteration,
            "model": _state_to_cpu(self.model, self.trainable_names | self._buffer_names()),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": "poly", "base_lr": self.options.lr,
                          "power": self.options.poly_power, "total": self.options.iterations},
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.rng_state(),
            "best": dict(self.best),
            "history": list(self.history[-1000:]),
            "options": asdict(self.options),
        }

    def _buffer_names(self) -> set[str]:
        return {n for n, _ in self.model.named_buffers()}

    def load_state(self, state: dict[str, Any]) -> None:
        result = self.model.load_state_dict(state["model"], strict=False)
        if result.unexpected_keys:
            raise MaskSAMError(
                "The checkpoint does not belong to this model (unexpected tensors "
                f"{result.unexpected_keys[:2]}); start a new run without --resume."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        self.best = dict(state.get("best") or self.best)
        self.history = list(state.get("history") or [])

    def save_checkpoint(self) -> None:
        if self.rank == 0:
            ckpt.save_checkpoint(self.train_dir / "checkpoint.pt", self.state())

    def save_weights(self, name: str) -> None:
        """Full model weights (safetensors) under ``out_dir/name``, atomically."""
        if self.rank != 0:
            return
        state = _state_to_cpu(self.model)
        bad = next((k for k, v in state.items()
                    if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if bad is not None:  # never publish a model that can only give empty label maps
            raise MaskSAMError(
                f"Training diverged: tensor {bad} holds NaN or Inf at iteration "
                f"{self.iteration}, so {name} was not written; lower --lr and start again."
            )
        with atomic_path(self.out_dir / name) as tmp:
            write_safetensors(state, tmp, metadata={"format": "pt"})

    # ------------------------------------------------------------------ stopping
    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason

    def _install_signal_handlers(self) -> dict[int, Any]:
        previous = {}

        def handler(signum: int, _frame: Any) -> None:
            self.request_stop(signal.Signals(signum).name)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _should_stop(self) -> bool:
        if self.rank == 0 and (self.out_dir / STOP_FILE).exists():
            self.request_stop("stop file")
        limit = self.options.time_limit_min
        if limit is not None and time.monotonic() - self._started > 60.0 * limit:
            self.request_stop(f"--time-limit {limit:g} min")
        flag = self._stop_reason is not None
        if self.world_size > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
            if flag and self._stop_reason is None:
                self._stop_reason = "another rank"
        return flag

    # ------------------------------------------------------------------ loop
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.history.append(record)
        with open(self.train_dir / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _step(self, iteration: int, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        opts = self.options
        lr = poly_lr(opts.lr, iteration, opts.iterations, opts.poly_power)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(opts.seed * 1_000_003 + iteration)  # point sampling: f(seed, it)
        terms: dict[str, float] = {}
        for batch in batches:
            image = batch["image"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            extra = ()
            if "encoded" in batch:
                neck, feats = batch["encoded"]
                extra = ((neck.to(self.device), [f.to(self.device) for f in feats]),)
            with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                outputs = self.net(image, *extra, decoder_chunk=self.decoder_chunk)
            outputs = {k: v.float() for k, v in outputs.items()}
            losses = self.criterion(outputs, label)
            loss = losses["loss"] / len(batches)
            if not torch.isfinite(loss):
                raise MaskSAMError(
                    f"The loss became {loss.item()} at iteration {iteration}; lower --lr and "
                    "resume from the last checkpoint."
                )
            self.scaler.scale(loss).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + float(v.detach()) / len(batches)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, opts.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        terms["lr"] = lr
        terms["grad_norm"] = float(grad_norm)
        return terms

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Per-class Dice of whole-volume sliding-window predictions on the validation cases."""
        self.model.eval()
        names = [lab.name for lab in self.model.config.labels]
        per_class: dict[str, list[float]] = {n: [] for n in names[1:]}
        try:
            for case in self.val_cases:
                image = torch.from_numpy(case.image)
                cache = None
                if self.cached:  # each validation volume is encoded once per run (or cached)
                    cache = self._val_encodings.get(case.case_id)
                    if cache is None:
                        cache = _HalfStore()
                        if case.case_id in self._val_encoded:
                            self._val_encoded[case.case_id].fill_window_cache(cache)
                        self._val_encodings[case.case_id] = cache
                pred = sliding_window_labels(
                    image, self.model, step=0.5, device=self.device, amp_dtype=self.amp_dtype,
                    encoder_cache=cache, decoder_chunk=self.decoder_chunk,
                )
                for k, name in enumerate(names[1:], start=1):
                    per_class[name].append(dice_score(pred == k, case.label == k))
        finally:
            self.model.train()
        mean = {n: float(np.mean(v)) for n, v in per_class.items() if v}
        return {"dice": mean, "mean_dice": float(np.mean(list(mean.values()))) if mean else 0.0}

    def run(self) -> dict[str, Any]:
        opts = self.options
        total = opts.iterations
        start = self.iteration
        if start >= total:
            # A run killed after its last checkpoint but before its final weights were written
            # resumes here: write them (from the checkpoint's exact state) before returning.
            self.save_weights("model_last.safetensors")
            if not self.val_cases or self.best["iteration"] < 0:
                self.save_weights("model.safetensors")
            return {"iterations": start, "best": self.best, "stopped": False}
        if self.rank == 0:
            self.train_dir.mkdir(parents=True, exist_ok=True)
        previous = self._install_signal_handlers()
        self._started = time.monotonic()
        # The cached recipe reads memory-mapped encoder output: no loader processes needed.
        loader = batch_loader(self.sampler, start=start * opts.accumulate,
                              stop=total * opts.accumulate,
                              workers=0 if self.cached else opts.workers)
        batches = iter(loader)
        self.model.train()
        progress = self.progress if self.rank == 0 else Progress("none")
        progress.start("train", total=total)
        t0 = time.monotonic()
        last_terms: dict[str, float] = {}
        try:
            for it in range(start, total):
                if self._should_stop():
                    raise _Stop()
                group = [next(batches) for _ in range(opts.accumulate)]
                last_terms = self._step(it, group)
                self.iteration = it + 1
                speed = (self.iteration - start) / max(time.monotonic() - t0, 1e-9)
                if self.iteration % opts.log_every == 0 or self.iteration == total:
                    self._log({"iteration": self.iteration, "time_s": round(time.monotonic()
                               - t0, 2), **{k: round(v, 6) for k, v in last_terms.items()}})
                progress.update(self.iteration, total, loss=round(last_terms["loss"], 5),
                                lr=last_terms["lr"], it_per_s=round(speed, 3))
                if self.val_cases and (self.iteration % opts.val_every == 0
                                       or self.iteration == total):
                    self._validate_and_keep_best(progress)
                if self.iteration % opts.checkpoint_every == 0 or self.iteration == total:
                    self.save_checkpoint()
                if self.world_size > 1:
                    torch.distributed.barrier()
        except _Stop:
            self.save_checkpoint()
            self.save_weights("model_last.safetensors")
            if self.rank == 0:
                (self.out_dir / STOP_FILE).unlink(missing_ok=True)
                if not (self.out_dir / "model.safetensors").exists():
                    self.save_weights("model.safetensors")
            raise Interrupted(
                f"Training stopped ({self._stop_reason}) at iteration {self.iteration} of "
                f"{total}; a checkpoint was saved: continue with --resume."
            ) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            del batches, loader
        self.save_weights("model_last.safetensors")
        if not self.val_cases or self.best["iteration"] < 0:
            self.save_weights("model.safetensors")
        progress.done(
            f"Training finished: {total} iterations"
            + (f", best mean Dice {self.best['dice']:.3f} at iteration {self.best['iteration']}"
               if self.best["iteration"] >= 0 else ""),
            model_dir=str(self.out_dir), loss=last_terms.get("loss"),
        )
        return {"iterations": total, "best": self.best, "stopped": False,
                "seconds": round(time.monotonic() - t0, 1), "last": last_terms}

    def _validate_and_keep_best(self, progress: Progress) -> None:
        if self.rank != 0:
            return
        result = self.validate()
        self._log({"iteration": self.iteration, "validation": result})
        progress.metric(iteration=self.iteration, dice=result["dice"],
                        mean_dice=round(result["mean_dice"], 4))
        progress.log(f"iteration {self.iteration}: validation mean Dice "
                     f"{result['mean_dice']:.3f}")
        if result["mean_dice"] > self.best["dice"]:
            self.best = {"dice": result["mean_dice"], "iteration": self.iteration}
            self.save_weights("model.safetensors")


class _Stop(Exception):
    pass


class _HalfStore(dict):
    """Encoded validation slices kept in float16 (half the memory) between validations."""

    def __setitem__(self, key: object, value: tuple) -> None:
        neck, feats = value
        super().__setitem__(key, (neck.detach().cpu().half(), [f.detach().cpu().half()
                                                               for f in feats]))

