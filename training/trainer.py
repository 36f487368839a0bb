"""The training loop: plain accelerate, one loop for every stage.

A run: read the datasets (``training.batching``), load the starting model (``training.start``: a preset or a previous
stage's ``final/``), let the stage's objective (``training.objectives``) say what trains and what the loss terms are,
check everything against the model, then train with a deterministic batch plan (``training.sampling``), writing
``metrics.jsonl``, TensorBoard scalars, resumable ``checkpoint-STEP/`` folders (``training.checkpoint``) and ``final/``
(a folder ``AnyGPTPipeline.from_pretrained`` loads).

Signals: the first SIGINT (Ctrl-C) or SIGTERM during the steps finishes the step, writes a checkpoint and stops
(``KeyboardInterrupt``; ``stop_signal`` says which); a second one, or one outside the steps, stops at once (temporary
files are removed on the way out). ``--resume auto`` continues from the newest good checkpoint: a damaged one is
named in a warning, set aside (``checkpoint-STEP.damaged``) and the one before it is used.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from tqdm.auto import tqdm
from transformers import get_scheduler

from anygpt.base.errors import CheckpointError, ConfigError, TrainingError
from anygpt.base.utils import write_text_atomic
from anygpt.core.lora import checkpoint_context_fn
from anygpt.core.pipeline import AnyGPTPipeline
from training.batching import Batcher, check_datasets, per_modality_lora, read_datasets
from training.checkpoint import (
    FINAL_DIR,
    any_process,
    apply_checkpoint,
    clean_partial,
    disk_full,
    format_size,
    free_space,
    list_checkpoints,
    load_checkpoint,
    move_damaged,
    resume_folder,
    run_lock,
    save_checkpoint,
    trim_metrics,
)
from training.config import TrainConfig
from training.diffusion import DiffusionLoss
from training.examples import Example, ExampleBuilder
from training.losses import LossBook
from training.objectives import StageModule, objective_for
from training.sampling import BatchPlan
from training.start import load_start
from training.trainables import apply_trainable

logger = logging.getLogger(__name__)

__all__ = ["FINAL_DIR", "METRICS_FILE", "StageTrainer", "TrainingError"]

METRICS_FILE = "metrics.jsonl"


class StageTrainer:
    """Runs one stage.

    Args:
        config: the validated ``TrainConfig``.
        start: preset name or folder to start from (None: ``config.model``).
        output_dir: overrides ``config.output_dir``.
        max_steps: overrides ``config.train.max_steps``.
        resume: None (a fresh run; refuses a folder holding a previous run), ``"auto"`` (continue from the newest
            complete checkpoint in the output folder, if any) or a checkpoint folder.
        accelerator: an ``accelerate.Accelerator`` (built from the config when None).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        start: str | None = None,
        output_dir: str | os.PathLike | None = None,
        max_steps: int | None = None,
        resume: str | None = None,
        accelerator=None,
    ):
        self.config = config
        self.start = str(start) if start is not None else config.model
        self.output_dir = Path(output_dir).expanduser().resolve() if output_dir else Path(config.output_dir)
        if max_steps is not None:
            if max_steps < 1:
                raise ConfigError(f"--max-steps must be >= 1, got {max_steps}")
            config.train.max_steps = max_steps
        self.resume = resume
        self.accelerator = accelerator or self._make_accelerator()
        self.objective = objective_for(config)
        self.trainable = self.objective.trainable
        self.pair_task = self.objective.pair_task

    def _make_accelerator(self) -> Accelerator:
        run = self.config.train
        if run.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError(f"{self.config.source}: train.mixed_precision: fp16 needs a GPU; use bf16 or no")
        return Accelerator(
            mixed_precision=run.mixed_precision,
            cpu=run.device == "cpu",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )

    # ------------------------------------------------------------------ setup
    def load_pipeline(self) -> AnyGPTPipeline:
        """The starting pipeline (see ``training.start.load_start``)."""
        return load_start(self.config, self.start, self.trainable)

    def example_builder(self, model) -> ExampleBuilder:
        """The stage's ``ExampleBuilder`` for ``model`` (length, pair task and prompts from the config)."""
        data = self.config.data
        return ExampleBuilder(
            model, max_length=data.max_length, pair_task=self.pair_task, caption_prompts=data.caption_prompts
        )

    def setup(self) -> None:
        """Everything before the first step; every error here is a clear ``ConfigError``."""
        config, acc, run = self.config, self.accelerator, self.config.train
        self.resume_from = resume_folder(self.output_dir, self.resume)
        self.data = read_datasets(config)  # data errors surface before a (possibly large) model loads
        self.pipe = self.load_pipeline()
        self.model = self.pipe.model
        self.decoders = self.pipe.decoders
        self.token_rows = apply_trainable(self.model, self.trainable)
        self.builder = self.example_builder(self.model)
        check_datasets(self.model, self.builder, self.data, config, self.trainable, self.pair_task)
        self.objective.check(self.model, self.data)

        self.global_batch = run.batch_size * acc.num_processes * run.gradient_accumulation_steps
        plan = BatchPlan(
            [len(r) for r in self.data.records], self.data.weights, self.global_batch, config.data.sampling, run.seed
        )
        self.max_steps = run.max_steps or max(1, math.ceil(run.epochs * plan.steps_per_epoch()))

        torch.manual_seed(run.seed + acc.process_index)  # dropout differs per process, as in one big batch
        self.diffusion = None
        if config.loss.diffusion.enabled:
            self.diffusion = DiffusionLoss(self.decoders, gamma=config.loss.diffusion.min_snr_gamma)
        # the frozen encoder runs outside the optimised module (feature cache): keep it out of DDP / FSDP / ZeRO
        self.encoder = self.model._modules.pop("encoder")
        self.model.__dict__["encoder"] = self.encoder
        self.module = self.objective.build_module(self.model, self.token_rows, self.diffusion)
        if run.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self.params = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError(
                f"{config.source}: nothing to train: the stage objective and `trainable:` leave every part frozen"
            )
        self.optimizer, self.scheduler = self._optimizer()
        self.module, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.encoder.to(acc.device)
        for decoder in self.decoders.values():
            decoder.to(device=acc.device)
        self.batcher = Batcher(
            config, self.model, self.builder, self.data, plan, encoder=self.encoder, decoders=self.decoders,
            diffusion=self.diffusion, device=acc.device, process_index=acc.process_index,
            num_processes=acc.num_processes,
        )  # fmt: skip
        self.terms = self.objective.terms(self.model)
        n_trainable = sum(p.numel() for _, p in self.params)
        n_total = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "stage %d (%s): %d trainable tensors, %s parameters (%.3f%% of %s); global batch %d; %d steps",
            config.stage,
            self.objective.title,
            len(self.params),
            f"{n_trainable:,}",
            100 * n_trainable / max(1, n_total),
            f"{n_total:,}",
            self.global_batch,
            self.max_steps,
        )

    def _enable_gradient_checkpointing(self) -> None:
        llm = self.model.language_model
        kwargs = {"use_reentrant": False}
        if self.per_modality_lora:  # recompute each layer with the adapter its forward ran with
            kwargs["context_fn"] = checkpoint_context_fn(llm, self.model.cross_attention)
        if hasattr(llm, "activation_checkpointing_enable"):  # transformers >= 5.x name
            llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(llm, "enable_input_require_grads"):
            llm.enable_input_require_grads()

    def _optimizer(self):
        """AdamW (no weight decay on biases, norms and token rows) and the learning-rate schedule."""
        config, run, optim = self.config, self.config.train, self.config.optim
        decay = [p for n, p in self.params if p.ndim >= 2 and not n.startswith("token_rows.")]
        no_decay = [p for n, p in self.params if not (p.ndim >= 2 and not n.startswith("token_rows."))]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
        )
        warmup = optim.warmup_steps if optim.warmup_steps is not None else int(optim.warmup_ratio * self.max_steps)
        name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[optim.schedule]
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=self.max_steps)
        acc = self.accelerator
        if acc.distributed_type.value == "DEEPSPEED":
            ds_config = acc.state.deepspeed_plugin.deepspeed_config
            if ds_config.get("gradient_accumulation_steps") not in (None, "auto", run.gradient_accumulation_steps):
                raise ConfigError(
                    f"{config.source}: train.gradient_accumulation_steps {run.gradient_accumulation_steps} differs "
                    f"from the DeepSpeed config's {ds_config['gradient_accumulation_steps']}; make them equal"
                )
            ds_config["gradient_accumulation_steps"] = run.gradient_accumulation_steps
            ds_config["train_micro_batch_size_per_gpu"] = run.batch_size
            acc.gradient_accumulation_steps = run.gradient_accumulation_steps
        return optimizer, scheduler

    # ------------------------------------------------------------------ state
    @property
    def per_modality_lora(self) -> bool:
        """The model has per-modality LoRA adapters (``lora.adapters``): batches route rows to them."""
        return per_modality_lora(self.model)

    @property
    def sharded(self) -> bool:
        """FSDP or DeepSpeed: parameters (ZeRO-3, FSDP) or optimizer state (ZeRO-2) live in shards."""
        return self.accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained tensors (this process's own parameters; not gathered)."""
        module = self.accelerator.unwrap_model(self.module)
        return {n: p for n, p in module.named_parameters() if p.requires_grad}

    def gathered_trainable(self) -> dict[str, torch.Tensor]:
        """The full trained tensors on the main process (all processes must call this; others get {})."""
        if not self.sharded:
            return self.trainable_state()
        full = self.accelerator.get_state_dict(self.module)  # a collective: gathers shards to the main process
        names = {n for n, _ in self.params}
        return {n: t for n, t in (full or {}).items() if n in names}

    def micro_batches(self, step: int) -> list[tuple[list[Example], list[int]]]:
        """This process's micro-batches of ``step``: examples and their positions in the global batch."""
        return self.batcher.micro_batches(step)

    def tensors(self, examples: list[Example], positions: list[int] | None = None, step: int = 0) -> dict:
        """The tensors of one micro-batch (see ``training.batching.Batcher.tensors``)."""
        return self.batcher.tensors(examples, positions, step)

    # ------------------------------------------------------------------ the loop
    def train(self) -> Path:
        """Run the stage; returns the ``final/`` folder.

        Raises:
            KeyboardInterrupt: SIGINT or SIGTERM (``stop_signal``); during the steps a checkpoint is written first.
            TrainingError: the run cannot go on (a non-finite loss, a full disk); the last checkpoint is intact.
        """
        self._stop = False
        self._in_loop = False
        self.stop_signal: int | None = None
        previous = _install_stop_signals(self)
        try:
            with contextlib.ExitStack() as stack:
                return self._train(stack)
        finally:
            _restore_stop_signals(previous)

    def _train(self, stack: contextlib.ExitStack) -> Path:
        self.setup()
        acc = self.accelerator
        run = self.config.train
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            stack.enter_context(run_lock(self.output_dir))  # what killed writes left is a dead run's: swept
            clean_partial(self.output_dir)
        acc.wait_for_everyone()
        start_step = self._resume() if self.resume_from is not None else 0
        if acc.is_main_process:
            self._write_run_files(start_step)
        writer = self._tensorboard(start_step)
        bar = tqdm(
            total=self.max_steps,
            initial=start_step,
            disable=not acc.is_local_main_process,
            desc=f"stage {self.config.stage}",
            dynamic_ncols=True,
        )
        self._train_mode()
        self._in_loop = True
        try:
            for step in range(start_step, self.max_steps):
                t0 = time.perf_counter()
                metrics = self._step(step)
                metrics["samples_per_s"] = self.global_batch / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", sps=f"{metrics['samples_per_s']:.1f}")
                done = step + 1
                if done % run.log_every == 0 or done == self.max_steps:
                    self._log(done, metrics, writer)
                if self._should_stop():
                    logger.warning("interrupted after step %d: writing checkpoint-%d to resume from", done, done)
                    self._save(done)
                    raise KeyboardInterrupt
                if run.save_every and done % run.save_every == 0 and done < self.max_steps:
                    self._save(done)
        finally:
            self._in_loop = False
            self.model.__dict__.pop("encoder", None)
            self.model._modules["encoder"] = self.encoder
            bar.close()
            if writer is not None:
                writer.close()
            self.batcher.flush()
        self._save(self.max_steps)
        return self._save_final()

    def _train_mode(self) -> None:
        """Train mode for the parts that train only: frozen parts keep their dropout off."""
        self.module.train()
        self.model.eval()
        if self.trainable.input_projectors:
            self.model.input_projectors.train()
        if self.trainable.output_projectors:
            self.model.output_projectors.train()
        if self.trainable.lora:
            self.model.language_model.train()

    def _should_stop(self) -> bool:
        """Ctrl-C (SIGINT) was pressed or SIGTERM came; all processes agree, so they stop after the same step."""
        flag = torch.tensor([1.0 if self._stop else 0.0], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def _step(self, step: int) -> dict:
        """One optimizer step over this process's micro-batches; returns the step's metrics."""
        acc = self.accelerator
        error: BaseException | None = None
        batches: list[dict] = []
        try:
            batches = [self.tensors(ex, pos, step) for ex, pos in self.micro_batches(step)]
        except Exception as err:  # noqa: BLE001 - reported below, on every process at once
            error = err
        book = LossBook(self.terms, self.objective.weights(self.terms), self._global_counts(batches, error, step))
        deepspeed = acc.distributed_type.value == "DEEPSPEED"
        # DDP averages gradients over processes and DeepSpeed also divides by its accumulation steps: undo both, the
        # loss is already normalised over the global batch
        scale = acc.num_processes * (len(batches) if deepspeed else 1)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            if deepspeed:
                context = acc.accumulate(self.module)
            elif not last and acc.num_processes > 1:
                context = acc.no_sync(self.module)
            else:
                context = contextlib.nullcontext()
            with context:
                parts = self.module(
                    b["input_ids"],
                    b["labels"],
                    b["attention_mask"],
                    b["media"],
                    b["targets"],
                    b["diffusion"],
                    adapters=b.get("adapters"),
                )
                acc.backward(book.loss(parts) * scale)
        means = book.means(acc.reduce(book.sums, reduction="sum") if acc.num_processes > 1 else None)
        loss_value = book.total(means)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"non-finite loss at step {step + 1} ({means}); the weights were not updated and the last checkpoint "
                f"in {self.output_dir} is intact. Lower optim.lr, use bf16 instead of fp16, or check this step's data"
            )
        params = [p for _, p in self.params]
        max_norm = self.config.optim.max_grad_norm
        grad_norm = acc.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))  # also the norm
        if grad_norm is not None and not math.isfinite(float(grad_norm)) and acc.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingError(
                f"non-finite gradient norm at step {step + 1} (loss {loss_value:.4g}); the weights were not updated "
                f"and the last checkpoint in {self.output_dir} is intact. Lower optim.lr or check this step's data"
            )
        self.optimizer.step()  # fp16: the gradient scaler skips a step with inf/NaN gradients by itself
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {"loss": loss_value, **{f"loss_{n}": v for n, v in means.items()}}
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics[self.objective.unit] = int(book.counts[0].item())
        return metrics

    def _global_counts(self, batches: list[dict], error: BaseException | None, step: int) -> torch.Tensor:
        """Each loss term's count over the global batch (every process and micro-batch divides by the same counts).

        Raises:
            TrainingError: on every process when any process failed to build its batch (so none waits forever).
        """
        acc = self.accelerator
        local = torch.zeros(len(self.terms) + 1, device=acc.device)
        local[-1] = 1.0 if error is not None else 0.0  # the last slot: this process failed to build its batch
        for b in batches:
            for j, count in enumerate(self.objective.counts(b, self.terms)):
                local[j] += count
        reduced = acc.reduce(local, reduction="sum") if acc.num_processes > 1 else local
        if reduced[-1] > 0:
            if error is not None and acc.num_processes == 1:
                raise error
            where = f"this process: {error}" if error is not None else "another process failed (see its message)"
            raise TrainingError(f"step {step + 1}: could not build the batch ({where})")
        return reduced[:-1]

    # ------------------------------------------------------------------ files
    def _state(self) -> dict:
        return {
            "stage": self.config.stage,
            "start": self.start,
            "world_size": self.accelerator.num_processes,
            "global_batch": self.global_batch,
            "max_steps": self.max_steps,
            "config": self.config.to_dict(),
        }

    def _save(self, step: int) -> None:
        save_checkpoint(
            self.accelerator,
            self.output_dir,
            step,
            trainable=self.gathered_trainable(),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=self._state(),
            keep=self.config.train.keep_checkpoints,
        )

    def _resume(self) -> int:
        """Load the checkpoint the run continues from; returns its step.

        ``--resume auto`` takes the newest checkpoint that is whole (``load_checkpoint``): a damaged one is named in
        a warning and set aside (``checkpoint-STEP.damaged``), and the one before it is tried. A checkpoint of
        another run (``ConfigError``) is never skipped.

        Raises:
            CheckpointError: the ``--resume`` folder is damaged, or no checkpoint of the folder is whole.
            ConfigError: the checkpoint belongs to another run.
        """
        acc = self.accelerator
        auto = self.resume == "auto"
        candidates = list(reversed(list_checkpoints(self.output_dir))) if auto else [self.resume_from]
        mine = self.trainable_state()
        damaged: list[tuple[Path, str]] = []
        for folder in candidates:
            problem = None
            try:
                loaded = load_checkpoint(
                    folder, run=self._state(), parameters=mine, optimizer=self.optimizer,
                    process_index=acc.process_index,
                )  # fmt: skip
            except CheckpointError as err:
                problem = str(err)
            if any_process(acc, problem is not None):
                problem = problem or "found damaged by another process (see its message)"
                if not auto:
                    raise CheckpointError(f"--resume {folder}: {problem}")
                logger.warning("%s is damaged, trying the checkpoint before it: %s", folder.name, problem)
                damaged.append((folder, problem))
                continue
            apply_checkpoint(acc, loaded, mine, optimizer=self.optimizer, scheduler=self.scheduler)
            if damaged:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    for bad, problem in damaged:
                        moved = move_damaged(bad)
                        logger.warning("resuming from %s: the damaged %s was moved to %s (%s)", folder.name,
                                       bad.name, moved.name, problem)  # fmt: skip
                acc.wait_for_everyone()
            logger.info("resumed from %s at step %d", folder, loaded.step)
            return loaded.step
        reasons = "; ".join(f"{folder.name}: {problem}" for folder, problem in damaged)
        raise CheckpointError(
            f"{self.output_dir}: no checkpoint to resume from is whole ({reasons}); remove the damaged ones to "
            "start again from the beginning"
        )

    def _write_run_files(self, start_step: int) -> None:
        # atomically: a run killed while writing it leaves the previous run's file (or none), never half of one
        write_text_atomic(self.output_dir / "train_config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        trim_metrics(self.output_dir / METRICS_FILE, start_step)  # a straight run's file, exactly, when resuming

    def _tensorboard(self, start_step: int):
        if not self.accelerator.is_main_process:
            return None
        try:  # a heavy import, and metrics.jsonl has everything without it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("tensorboard is not installed: writing metrics.jsonl only")
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def _log(self, step: int, metrics: dict, writer) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in metrics.items():
                writer.add_scalar(f"train/{key}", value, step)

    def _save_final(self) -> Path:
        """Write ``final/`` (atomically: a failed or killed save leaves the previous one, if any).

        Raises:
            TrainingError: the disk is full (saying how much to free); checkpoint-MAX_STEPS is intact, so a rerun
                with ``--resume auto`` only writes ``final/``.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.output_dir / FINAL_DIR
        error: BaseException | None = None
        if self.sharded:
            # the live parameters are shards: write the gathered tensors into a fresh copy of the model
            state = self.gathered_trainable()
            if acc.is_main_process:
                pipe = self.load_pipeline()
                rows = apply_trainable(pipe.model, self.trainable)
                copy = StageModule(pipe.model, rows, distance=self.config.loss.distance)  # names the model's tensors
                with torch.no_grad():
                    for name, param in copy.named_parameters():
                        if name in state:
                            param.copy_(state[name].to(param))
                if rows is not None:
                    rows.remove()
                error = _save_pipeline(pipe, folder)
        else:
            if self.token_rows is not None:
                self.token_rows.merge()
            if acc.is_main_process:
                error = _save_pipeline(AnyGPTPipeline(self.model, self.decoders), folder)
        if any_process(acc, error is not None):
            free = free_space(self.output_dir)
            raise TrainingError(
                f"no space left on the device of {self.output_dir} while writing {FINAL_DIR}/ (it needs about "
                f"{format_size(_final_size(self.model))}{f', {format_size(free)} are free' if free is not None else ''}"
                f"): free space there, then run again with --resume auto (checkpoint-{self.max_steps} is intact: "
                f"no step is trained again)"
            ) from None
        if acc.is_main_process:
            logger.info("stage %d done: %s", self.config.stage, folder)
        acc.wait_for_everyone()
        return folder


def _save_pipeline(pipe: AnyGPTPipeline, folder: Path) -> BaseException | None:
    """``pipe.save_pretrained(folder)``; returns the error of a full disk (any other error is raised)."""
    try:
        pipe.save_pretrained(folder)
    except Exception as err:
        if not disk_full(err):
            raise
        return err
    return None


def _final_size(model) -> int:
    """About the bytes ``save_pretrained`` writes for ``model``: projectors, cross-attention, LoRA, token rows."""
    tensors = [*model.input_projectors.state_dict().values(), *model.output_projectors.state_dict().values()]
    if model.cross_attention is not None:
        tensors += list(model.cross_attention.state_dict().values())
    tensors += [p for n, p in model.language_model.named_parameters() if "lora_" in n]
    rows = len(set(model.tokens.all_added_ids) | set(model.trained_base_rows))
    return sum(t.numel() * t.element_size() for t in tensors) + 2 * rows * model.hidden_size * 4


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _install_stop_signals(trainer: StageTrainer) -> dict:
    """SIGINT (Ctrl-C) and SIGTERM, alike: during the steps the first one finishes the step, writes a checkpoint and
    stops; a second one, or one outside the steps (loading, the final save), stops at once with
    ``KeyboardInterrupt``, so that the writers remove their temporary files. Returns the previous handlers."""

    def handler(signum, frame):
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if trainer.stop_signal is None:
            trainer.stop_signal = signum
        if trainer._stop or not trainer._in_loop:
            raise KeyboardInterrupt
        trainer._stop = True
        logger.warning("%s: stopping after this step with a checkpoint (send it again to stop at once)", name)

    previous = {}
    for signum in STOP_SIGNALS:
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: no handler, a signal stops at once
            break
    return previous


def _restore_stop_signals(previous: dict) -> None:
    for signum, handler in previous.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
