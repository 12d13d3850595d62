"""The training job: build, train with the achievement-weighted multi-task loss + MIM, evaluate each epoch,
broadcast the new task weights, checkpoint, export adapters. Model code knows nothing of parallelism; every
DeepSpeed call goes through DeepSpeedRunner."""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from ..adapters import save_adapter
from ..adapters.export import model_card
from ..adapters.config import AdapterConfigError, CLoRAEConfig
from ..data.record import TASKS, Record
from ..data.render import render
from ..eval import dataset_f1, score
from ..eval.generate import GENERATE_INPUTS, generate_rows, write_predictions
from ..eval.inference import encoding_for
from ..progress import PROGRESS
from ..adapters import parameter_report, routing_stats
from ..adapters.model import parameter_groups
from ..eval.plots import plot_run, read_events
from ..eval.report import routing_report, write_routing
from ..metrics import MetricsExporter
from .aml import AchievementWeights
from .config import RunConfig
from .ds_config import MONITOR_PACKAGES, ds_settings, load_ds_config, precision_of, zero_stage
from .engine import PORTABLE_STATE, DeepSpeedRunner, barrier, init_distributed

MODEL_INPUTS = GENERATE_INPUTS + ("labels",)


class TrainingError(RuntimeError):
    pass




EVENTS_NAME = "events.jsonl"  # every JSON event of a run, beside its outputs (rank 0; a resumed run appends)


def log_json(**fields) -> None:
    PROGRESS.clear()
    line = json.dumps(fields, default=float)
    print(line, flush=True)
    if EVENT_LOG:
        with open(EVENT_LOG[0], "a") as f:
            f.write(line + "\n")


EVENT_LOG: list = []  # the running job's events.jsonl path, set by the Trainer on rank 0


@dataclass
class RunState:
    """Where the run is: what a checkpoint's client state holds besides the task weights."""
    epoch: int = 0
    batch_in_epoch: int = 0  # the next micro-batch of the epoch
    best_all: float = -1.0
    skipped_steps: int = 0
    stop: bool = False


class IntervalLog:
    """Sums over a logging interval, kept on the device (no host sync per step) and read once per interval."""

    def __init__(self, num_datasets: int, device, mim_beta: float):
        self.num_datasets, self.device, self.mim_beta, self.last_loss = num_datasets, device, mim_beta, float("nan")
        self._reset()

    def _reset(self) -> None:
        zeros = torch.zeros(self.num_datasets, device=self.device)
        self.mim, self.dataset_sum, self.dataset_tokens = None, zeros, zeros.clone()
        self.steps = self.samples = self.tokens = 0
        self.data_wait, self.since = 0.0, time.perf_counter()

    def add(self, dataset_sum, dataset_tokens, mim, samples: int, tokens: int, data_wait: float) -> None:
        if mim is not None:
            self.mim = mim.detach().float() + (0.0 if self.mim is None else self.mim)
        self.dataset_sum += dataset_sum.detach().float()
        self.dataset_tokens += dataset_tokens.detach().float()
        self.steps, self.samples, self.tokens = self.steps + 1, self.samples + samples, self.tokens + tokens
        self.data_wait += data_wait

    def _loss(self, task_weights: torch.Tensor) -> float:
        """The training loss over this rank's micro-batches of the interval: L_MT over all their target tokens
        + β × the mean L_MIM."""
        loss = multi_task_loss(task_weights, self.dataset_sum, self.dataset_tokens.sum())
        return float(loss + (0.0 if self.mim is None else self.mim_beta * self.mim / max(1, self.steps)))

    def final_loss(self, task_weights: torch.Tensor) -> Optional[float]:
        """The loss of the micro-batches since the last logged interval, else of that interval (None: no step)."""
        loss = self._loss(task_weights) if self.steps else self.last_loss
        return None if math.isnan(loss) else loss

    def take(self, task_weights: torch.Tensor) -> dict:
        """Interval means (loss, per-dataset token loss, MIM), this rank's samples/s and tokens/s, data wait."""
        elapsed, steps = max(time.perf_counter() - self.since, 1e-9), max(1, self.steps)
        self.last_loss = self._loss(task_weights)
        means = {"loss": self.last_loss, "mim": None if self.mim is None else float(self.mim) / steps,
                 "dataset_loss": (self.dataset_sum / self.dataset_tokens.clamp(min=1)).tolist(),
                 "dataset_present": (self.dataset_tokens > 0).tolist(), "samples_per_s": self.samples / elapsed,
                 "tokens_per_s": self.tokens / elapsed, "data_wait": self.data_wait}
        self._reset()
        return means


def per_dataset_token_loss(logits: torch.Tensor, labels: torch.Tensor, dataset_ids: torch.Tensor, causal: bool,
                           num_datasets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy of each dataset's samples in the micro-batch and their token counts:
    (sums (M,), tokens (M,))."""
    if causal:  # decoder-only: position t predicts token t + 1
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    mask = (labels != -100).float()
    sample_sum, sample_tokens = (token_loss * mask).sum(1), mask.sum(1)
    one_hot = (dataset_ids[:, None] == torch.arange(num_datasets, device=dataset_ids.device)).float()  # no range check
    return one_hot.t() @ sample_sum, one_hot.t() @ sample_tokens


def multi_task_loss(task_weights: torch.Tensor, dataset_sum: torch.Tensor, target_tokens: torch.Tensor):
    """L_MT (method.md eq. 10, L_m summing its samples' token cross-entropy) per target token:
    Σ_m M·w_m·L_m / target_tokens. Each token weighs M·w_m / target_tokens whatever datasets share its batch, and
    uniform weights (1/M) give the ordinary mean token loss. In training, target_tokens counts the whole
    optimiser step (every micro-batch of every rank): a token weighs the same however the step's samples are cut
    into micro-batches, accumulated or spread over ranks."""
    return len(task_weights) * (task_weights * dataset_sum).sum() / target_tokens.clamp(min=1)


def _texts_from_shards(patterns: dict, limit: int = 4000) -> list[str]:
    import webdataset as wds

    texts = []
    for pattern in patterns.values():
        for url in wds.shardlists.expand_urls(pattern):
            with tarfile.open(url) as tar:
                for member in tar:
                    if member.name.endswith(".json") and len(texts) < limit:
                        source, target = render(Record.from_dict(json.load(tar.extractfile(member))))
                        texts += [source, target]
    return texts


class Trainer:
    def __init__(self, config: RunConfig, ds_config_path: str, resume: Optional[str] = None, ds_overrides=()):
        self.config, self.resume = config, resume
        self.ctx = init_distributed(config.dist_timeout_s)
        self.is_main = self.ctx.rank == 0
        torch.manual_seed(config.seed)  # identical adapter initialisation on every rank
        self.ds_config = load_ds_config(ds_config_path, self.ctx.world_size, ds_overrides, config.data.micro_batch_size)
        for name in MONITOR_PACKAGES:  # monitors write into the run unless told otherwise (wandb has no path)
            section = self.ds_config.get(name, {})
            if name != "wandb" and section.get("enabled") and not section.get("output_path"):
                section["output_path"] = os.path.join(config.output.dir, "monitors")
        # what the run trains in after load_ds_config's hardware fallback; a resume must not change it
        self.precision = precision_of(self.ds_config)
        self.out = config.output.dir
        self._check_output_dir()
        self.checkpoint = self._find_checkpoint() if resume else None  # what --resume continues from
        self.rescale = self._plan_rescale()  # resuming at another world size or ZeRO stage
        if self.is_main:  # what trains how, and who said so (README: the recipe and the DeepSpeed config)
            EVENT_LOG[:] = [os.path.join(self.out, EVENTS_NAME)]
            optim = config.optim
            log_json(event="setup", **ds_settings(ds_config_path, ds_overrides, self.ds_config),
                     optimizer={"value": f"AdamW lr {optim.lr:g} (experts), {optim.new_module_lr:g} (new modules), "
                                         f"betas {tuple(optim.betas)}, weight decay {optim.weight_decay:g}",
                                "from": "recipe optim.*"},
                     scheduler={"value": f"{optim.warmup_steps} warmup steps, then {optim.decay}",
                                "from": "recipe optim.warmup_steps, optim.decay"})

        model_config = replace(config.model)  # its tokenizer may be set below
        tokenizer_dir = os.path.join(self.out, "tokenizer")
        if model_config.preset is not None and model_config.tokenizer is None:
            # A preset's tokenizer is trained once, on rank 0, from the training text.
            if self.is_main and not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
                from ..models import train_tokenizer

                train_tokenizer(_texts_from_shards(config.data.train), tokenizer_dir, model_config.tokenizer_vocab_size)
            barrier()
            model_config.tokenizer = tokenizer_dir
        self.model_config = model_config
        # Random weights (presets) are drawn on the device itself: a T5-XL shape initialises in seconds there.
        with torch.device(self.ctx.device) if model_config.preset is not None else contextlib.nullcontext():
            built = model_config.build()
        self.model, self.tokenizer = built.model, built.tokenizer
        self.adapter: Optional[CLoRAEConfig] = getattr(self.model, "clorae_config", None)
        self.mim_beta = self.adapter.mim_beta if self.adapter and self.adapter.uses_mim else 0.0
        self.causal = model_config.family == "llava"
        encoding = encoding_for(built, config.data.max_input_length, config.data.max_target_length,
                                config.data.image_size)
        data = replace(config.data, batches_per_epoch=self._batches_per_epoch())
        loader_args = dict(tasks=self.adapter.tasks if self.adapter else TASKS, eval_batch_size=config.eval.batch_size,
                           seed=config.seed)
        self.loader = data.build(self.tokenizer, encoding, self.ctx.rank, self.ctx.world_size, **loader_args)
        self.datasets = self.loader.datasets
        self.train_datasets = sorted(config.data.train)
        # loader dataset id → position among the trained datasets (the order of the task weights)
        self.to_train = torch.tensor([self.train_datasets.index(d) if d in self.train_datasets else -1
                                      for d in self.datasets], device=self.ctx.device)
        self.accumulation = self.ds_config.get("gradient_accumulation_steps", 1)
        # Whole optimiser steps per epoch: a step's loss is normalised by all its micro-batches' target tokens,
        # which must be at hand before its first backward (an evaluation would fall inside a straddling step).
        if self.loader.batches_per_epoch % self.accumulation:
            if config.data.batches_per_epoch is not None:
                raise TrainingError(f"data.batches_per_epoch {self.loader.batches_per_epoch} (micro-batches per rank) "
                                    f"is not a multiple of gradient_accumulation_steps {self.accumulation}")
            self.loader.batches_per_epoch += self.accumulation - self.loader.batches_per_epoch % self.accumulation
        steps_per_epoch = self.loader.batches_per_epoch // self.accumulation
        self.total_steps = config.schedule.max_steps or steps_per_epoch * config.schedule.epochs

        optim = config.optim
        groups = parameter_groups(self.model, optim.lr, optim.new_module_lr, optim.weight_decay)
        if config.model.compile:
            # In place (nn.Module.compile) before DeepSpeed wraps the model: its parameter names, hooks and
            # checkpoints stay the eager model's, where a wrapper (torch.compile(model), engine.compile()) would
            # rename or re-wrap them.
            self.model.compile(backend=config.model.compile_backend)
        self.runner = DeepSpeedRunner(self.model, self.ds_config, groups, optim.betas, optim.warmup_steps,
                                      self.total_steps, optim.decay, self.ctx)
        self.runner.time_phases = config.schedule.time_phases
        self.aml = AchievementWeights(self.train_datasets, config.loss.reference_f1, config.loss.margin,
                                      config.loss.gamma, config.loss.ema, enabled=config.loss.aml)
        # A dev loader for rank 0 alone: under ZeRO-0/1/2 it evaluates while the other ranks wait.
        self.solo_eval_loader = data.build(self.tokenizer, encoding, 0, 1, **loader_args) if self.is_main else None
        if self.is_main:
            log_json(event="model", world_size=self.ctx.world_size, **parameter_report(self.model))
        self.metrics = MetricsExporter(config.metrics, self.ctx.rank, self.ctx.local_rank)
        addresses = self.runner.gather_objects(self.metrics.address)
        if self.is_main and config.metrics.port:
            targets = config.metrics.targets_file or os.path.join(self.out, "metrics_targets.json")
            os.makedirs(os.path.dirname(os.path.abspath(targets)), exist_ok=True)
            self.metrics.write_targets(targets, addresses)

    def _check_output_dir(self) -> None:
        try:
            os.makedirs(self.out, exist_ok=True)
            probe = os.path.join(self.out, f".write-test-{self.ctx.rank}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as err:
            raise TrainingError(f"output directory {self.out!r} is not writable: {err}") from None

    # --- the run -------------------------------------------------------------------------------------
    def begin(self) -> RunState:
        """The run's state, resumed or new, with the per-run sums reset: what train_step needs."""
        state = self._resume()
        self.task_weights = torch.tensor(self.aml.weights, device=self.ctx.device)
        self.metrics.on_weights(self.train_datasets, self.aml.weights)
        self.interval = IntervalLog(len(self.train_datasets), self.ctx.device, self.mim_beta)
        self.first_nonfinite = torch.tensor(math.inf, device=self.ctx.device)  # the step of a non-finite loss
        state.stop = self.runner.global_step >= self.total_steps
        self._start_epoch()
        return state

    def _start_epoch(self) -> None:
        self.runner.module.train()  # evaluation left it in eval mode
        self.step_end = time.perf_counter()

    def run(self) -> dict:
        state = self.begin()
        report, start = None, time.time()
        while not state.stop and state.epoch < self.config.schedule.epochs:
            self._start_epoch()
            batches = iter(self.loader.train_epoch(state.epoch, skip_batches=state.batch_in_epoch))
            while not state.stop:
                step_batches = list(itertools.islice(batches, self.runner.micro_batches_left_in_step))
                if not step_batches:
                    break
                self.train_optimizer_step(step_batches, state, start)
                every = self.config.output.save_every_steps
                if every and self.runner.global_step % every == 0 and not state.stop:
                    self._check_run(state, start)
                    self._checkpoint(state)
            report = self.end_epoch(state, start)
        return self._summary(state, report or self.evaluate(), start)

    def train_optimizer_step(self, batches: list[dict], state: RunState, start: float) -> None:
        """The micro-batches of one optimiser step on this rank: their target tokens summed over ranks (on the
        device) normalise the loss of each."""
        target_tokens = self.runner.sum_on_device(sum(batch["target_tokens"] for batch in batches))
        # DeepSpeed divides each micro-batch's gradient by the accumulation and averages over ranks: undone here,
        # so that the step's gradient is that of Σ_tokens loss / target_tokens.
        scale = self.accumulation * self.ctx.world_size
        for batch in batches:
            self.train_step(batch, state, start, target_tokens / scale)
            if state.stop:
                return

    def train_step(self, batch: dict, state: RunState, start: float, target_tokens: torch.Tensor) -> None:
        """One micro-batch: forward, L_MT + β·L_MIM, backward, step, with no host sync of the project's own
        (the checks every rank must agree on run at log intervals, _check_run) unless loss.nonfinite=skip.
        target_tokens: the optimiser step's target tokens over ranks, over world size × accumulation."""
        config, runner = self.config, self.runner
        batch_ready = time.perf_counter()
        log_now = (runner.global_step + 1) % config.schedule.log_every == 0
        inputs = {k: v.to(self.ctx.device) for k, v in batch.items() if k in MODEL_INPUTS}
        if config.model.compile:  # batch size and lengths vary: one graph for all, not a recompile for each
            for tensor in inputs.values():
                for dim in range(min(tensor.dim(), 2)):
                    torch._dynamo.maybe_mark_dynamic(tensor, dim)
        out = runner.forward(**inputs, record_routing=log_now, return_loss=False, return_mim=self.mim_beta > 0)
        dataset_sum, dataset_tokens = per_dataset_token_loss(
            out.logits, inputs["labels"], self.to_train[batch["dataset_ids"].to(self.ctx.device)], self.causal,
            len(self.train_datasets))
        loss = multi_task_loss(self.task_weights, dataset_sum, target_tokens)
        mim = out.get("mim_loss")
        if mim is not None:
            loss = loss + self.mim_beta * mim
        state.batch_in_epoch += 1
        finite = torch.isfinite(loss)
        if config.loss.nonfinite == "skip":
            # Skipping is decided on the host before the step, by every rank together (or the gradient
            # all-reduce of the ranks that go on waits forever): one small all-reduce a micro-batch.
            if runner.max_across_ranks(finite.logical_not().reshape(1))[0]:
                state.skipped_steps += 1
                if state.skipped_steps > config.loss.max_skipped_steps:
                    raise TrainingError(f"non-finite loss at step {runner.global_step} (epoch {state.epoch}, batch "
                                        f"{state.batch_in_epoch - 1}) on some rank, {state.skipped_steps} skipped: "
                                        f"more than loss.max_skipped_steps={config.loss.max_skipped_steps}")
                return
        else:  # noted on the device, read by the next _check_run
            self.first_nonfinite = torch.where(finite, self.first_nonfinite,
                                               self.first_nonfinite.clamp(max=runner.global_step))
        runner.backward(loss)
        runner.step()
        tokens = batch["tokens"]
        now = time.perf_counter()
        self.interval.add(dataset_sum, dataset_tokens, mim, len(batch["ids"]), tokens, batch_ready - self.step_end)
        self.metrics.on_step(len(batch["ids"]), tokens, now - batch_ready, batch_ready - self.step_end, batch["skipped"])
        self.step_end = now
        if log_now:
            self._check_run(state, start)
            self._log_interval(state, batch["skipped"], start)
        state.stop = state.stop or runner.global_step >= self.total_steps

    def _check_run(self, state: RunState, start: float) -> None:
        """What every rank must agree on, read on the host at log intervals, before a checkpoint and at an
        epoch's end (one small all-reduce): a non-finite loss on any rank stops the run naming its first step
        (loss.nonfinite=stop), and rank 0's clock ends it once schedule.max_minutes have passed."""
        out_of_time = self.config.schedule.max_minutes is not None and self.is_main and \
            time.time() - start > 60 * self.config.schedule.max_minutes
        flags = torch.stack([self.first_nonfinite.neg(), self.first_nonfinite.new_tensor(float(out_of_time))])
        first_nonfinite, out_of_time = self.runner.max_across_ranks(flags)
        if first_nonfinite != -math.inf:
            raise TrainingError(f"non-finite loss at step {int(-first_nonfinite)} on some rank, found at step "
                                f"{self.runner.global_step} (epoch {state.epoch}); loss.nonfinite=stop")
        state.stop = state.stop or bool(out_of_time)

    def _log_interval(self, state: RunState, skipped: dict, start: float) -> None:
        """Means over the logging interval (values reach the host only here), metrics, the progress line and
        the `train` JSON event."""
        runner, means = self.runner, self.interval.take(self.task_weights)
        losses = {d: means["dataset_loss"][i] for i, d in enumerate(self.train_datasets) if means["dataset_present"][i]}
        gates = routing_report(routing_stats(runner.module), self.adapter.tasks)["layer_groups"] \
            if self.adapter is not None and self.adapter.uses_gate else {}
        self.metrics.on_log(losses, means["mim"], runner.learning_rates.get("experts", 0.0), state.epoch, gates)
        if not self.is_main:
            return
        world = self.ctx.world_size
        step = runner.global_step
        runner.write_metrics([("Train/loss", means["loss"], step), ("Train/samples_per_s", means["samples_per_s"] * world, step),
                              ("Train/tokens_per_s", means["tokens_per_s"] * world, step)]
                             + [(f"Train/loss/{d}", v, step) for d, v in losses.items()]
                             + ([("Train/mim_loss", means["mim"], step)] if means["mim"] is not None else [])
                             + [(f"Train/lr/{group}", lr, step) for group, lr in runner.learning_rates.items()])
        eta = (self.total_steps - runner.global_step) * (time.time() - start) / max(1, runner.global_step)
        PROGRESS.show(f"step {runner.global_step}/{self.total_steps} epoch {state.epoch} loss {means['loss']:.4f} "
                      f"{means['samples_per_s'] * world:.1f} samples/s ETA {eta / 60:.1f} min")
        log_json(event="train", step=runner.global_step, epoch=state.epoch, loss=round(means["loss"], 5),
                 dataset_loss={d: round(v, 5) for d, v in losses.items()},
                 mim_loss=None if means["mim"] is None else round(means["mim"], 5), lr=runner.learning_rates,
                 samples_per_s=round(means["samples_per_s"] * world, 2),
                 tokens_per_s=round(means["tokens_per_s"] * world, 1),
                 phase_seconds={k: round(v, 4) for k, v in
                                {"data_wait": means["data_wait"], **runner.take_phase_seconds()}.items()},
                 skipped=skipped)

    def end_epoch(self, state: RunState, start: float) -> dict:
        """Evaluate; after a complete epoch, new task weights from rank 0's scores on every rank; save."""
        self._check_run(state, start)
        report = self.evaluate()
        if state.batch_in_epoch >= self.loader.batches_per_epoch:
            # Rank 0 computes the weights from its scores and every rank takes its copy: identical weights
            # everywhere. They change only at epoch boundaries, so a resumed run follows the same sequence.
            if self.is_main:
                self.aml.update(dataset_f1(report))
            self.aml.load_state_dict(self.runner.broadcast_object(self.aml.state_dict() if self.is_main else None))
            self.task_weights = torch.tensor(self.aml.weights, device=self.ctx.device)
            self.metrics.on_weights(self.train_datasets, self.aml.weights)
            per_rank = self.runner.gather_objects(self.aml.weights)  # what each rank will train with
            if self.is_main:
                log_json(event="task_weights", epoch=state.epoch, datasets=self.train_datasets, per_rank=per_rank,
                         achievement=self.aml.achievement)
                self.runner.write_metrics([(f"Train/task_weight/{d}", w, self.runner.global_step)
                                           for d, w in zip(self.train_datasets, self.aml.weights)])
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        self._save(report, state)
        return report

    def _summary(self, state: RunState, report: dict, start: float) -> dict:
        summary = {"event": "summary", "global_step": self.runner.global_step, "epochs": state.epoch,
                   "final_loss": self.interval.final_loss(self.task_weights), "task_weights": dict(zip(self.train_datasets, self.aml.weights)),
                   "dev_f1": {k: v["f1"] for k, v in report.items() if k != "All"}, "dev_all": report["All"],
                   "adapter": os.path.join(self.out, "adapter"), "best_adapter": os.path.join(self.out, "adapter_best"),
                   "skipped_steps": state.skipped_steps, "train_seconds": round(time.time() - start, 1)}
        if self.ctx.device.type == "cuda":
            summary["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.ctx.device)
        if self.is_main:
            log_json(**summary)
            self._draw()
        self.metrics.close()
        return summary

    def _draw(self) -> None:
        """run.png (training curves) and, with a gate, routing.png / routing.json (gate weight on the task expert
        per layer group and task over the final evaluation's generation: the paper's Fig. 6)."""
        plot_run(read_events(EVENT_LOG[0]), os.path.join(self.out, "run.png"))
        if self.adapter is not None and self.adapter.uses_gate:
            write_routing(routing_report(routing_stats(self.runner.module), self.adapter.tasks), self.out)

    # --- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Generate on the dev splits and score. ZeRO-3: every rank generates its share (synced_gpus) and rank 0
        scores the gathered rows. ZeRO-0/1/2: rank 0 evaluates alone; the others wait at the broadcast (bounded
        by dist_timeout_s)."""
        runner, zero3 = self.runner, self.runner.zero_stage == 3
        rows = []
        if zero3 or self.is_main:
            loader = self.loader if zero3 else self.solo_eval_loader
            world = self.ctx.world_size if zero3 else 1
            limit = None
            if self.config.eval.max_samples:
                limit = math.ceil(self.config.eval.max_samples / (self.config.eval.batch_size * world))
            model = runner.module.eval()
            for dataset in sorted(self.config.data.dev):
                rows += generate_rows(model, self.tokenizer, loader.eval_batches(dataset), self.ctx.device,
                                      self.config.eval.max_new_tokens, self.config.eval.num_beams, zero3, limit)
            runner.module.train()
        if zero3:
            rows = [row for part in runner.gather_objects(rows) for row in part]
        report = score([r["predicted"] for r in rows], [r["gold"] for r in rows],
                       [r["key"] for r in rows]) if self.is_main else None
        report = runner.broadcast_object(report)
        self.metrics.on_eval(report)
        if self.is_main:  # the latest evaluation's rows: what the final dev F1 was computed from
            write_predictions(os.path.join(self.out, "dev_predictions.jsonl"), rows, step=runner.global_step)
            log_json(event="eval", step=runner.global_step, samples=len(rows), all=round(report["All"], 3),
                     f1={k: round(v["f1"], 4) for k, v in report.items() if k != "All"})
            runner.write_metrics([("Eval/all", report["All"], runner.global_step)] +
                                 [(f"Eval/f1/{k}", v["f1"], runner.global_step) for k, v in report.items() if k != "All"])
        return report

    # --- checkpoints -----------------------------------------------------------------------------------
    def _client_state(self, state: RunState) -> dict:
        return {"epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch, "best_all": state.best_all,
                "skipped_steps": state.skipped_steps, "aml": self.aml.state_dict(),
                "adapter_config": self.adapter.to_dict() if self.adapter else None, "datasets": self.train_datasets,
                "precision": self.precision, "world_size": self.ctx.world_size,
                "micro_batch": self.ds_config["train_micro_batch_size_per_gpu"], "accumulation": self.accumulation,
                "zero_stage": self.runner.zero_stage}

    def _checkpoint(self, state: RunState) -> None:
        """Trainable weights, optimizer, scheduler, RNG and the run's position (epoch, next batch, task weights):
        what --resume continues from exactly."""
        if self.config.output.save:
            self.runner.save(os.path.join(self.out, "checkpoints"), f"global_step{self.runner.global_step}",
                             self._client_state(state), self.config.output.keep_last)

    def _save(self, report: dict, state: RunState) -> None:
        """After an evaluation: a checkpoint, the adapter, and the best adapter so far."""
        runner = self.runner
        best = report["All"] > state.best_all
        state.best_all = max(state.best_all, report["All"])
        if not self.config.output.save:
            return
        self._checkpoint(state)
        tensors = runner.adapter_tensors()  # a collective under ZeRO-3: every rank calls it
        if self.is_main and self.adapter is not None:
            card = model_card(self.adapter, self.model_config.pretrained or f"{self.model_config.family} preset "
                              f"{self.model_config.preset}", self.train_datasets, runner.global_step,
                              {k: v["f1"] for k, v in report.items() if k != "All"}, report["All"])
            save_adapter(runner.module, os.path.join(self.out, "adapter"), tensors, card)
            if best:
                save_adapter(runner.module, os.path.join(self.out, "adapter_best"), tensors, card)
            with open(os.path.join(self.out, "run_config.json"), "w") as f:
                json.dump({"run": self.config.to_dict(), "model": asdict(self.model_config)}, f, indent=1, default=str)
        runner.barrier()

    def _find_checkpoint(self) -> Optional[tuple[str, str, dict]]:
        """(directory, tag, run state) of the checkpoint --resume names; None for 'auto' with nothing saved."""
        directory = os.path.join(self.out, "checkpoints") if self.resume == "auto" else self.resume
        tag = None
        if self.resume != "auto" and os.path.basename(os.path.normpath(directory)).startswith("global_step"):
            directory, tag = os.path.split(os.path.normpath(directory))
        found = DeepSpeedRunner.read_client_state(directory, tag)
        if found is None:
            if self.resume == "auto":
                return None  # nothing saved yet: a fresh start (a requeued job's first attempt)
            raise TrainingError(f"--resume {self.resume}: no clorae_ds checkpoint in {directory!r}")
        return directory, *found

    def _batches_per_epoch(self) -> Optional[int]:
        """data.batches_per_epoch counts micro-batches per rank: at a new accumulation it scales with it, so that an
        epoch keeps its optimiser steps (unset, the loader derives it from the data, which scales by itself)."""
        per_rank = self.config.data.batches_per_epoch
        if per_rank is None or self.rescale is None:
            return per_rank
        old, new = self.rescale["accumulation"]
        return per_rank * new // old

    def _plan_rescale(self) -> Optional[dict]:
        """At another world size than the checkpoint's: the gradient accumulation that keeps its global batch
        (micro-batch × accumulation × world size), set in the DeepSpeed config before the engine exists; refused
        when no whole accumulation keeps it."""
        found, stage = self.checkpoint, zero_stage(self.ds_config)
        if found is None or (found[2].get("world_size", self.ctx.world_size) == self.ctx.world_size
                             and found[2].get("zero_stage", stage) == stage):
            return None
        state, world = found[2], self.ctx.world_size
        micro = self.ds_config["train_micro_batch_size_per_gpu"]
        global_batch = state["micro_batch"] * state["accumulation"] * state["world_size"]
        if global_batch % (micro * world):
            raise TrainingError(
                f"--resume: the checkpoint trained with a global batch of {global_batch} (micro-batch "
                f"{state['micro_batch']} x accumulation {state['accumulation']} x {state['world_size']} ranks), which "
                f"micro-batch {micro} x {world} ranks cannot keep with a whole accumulation: set "
                f"data.micro_batch_size to a divisor of {global_batch // world}")
        accumulation = global_batch // (micro * world)
        self.ds_config.update(gradient_accumulation_steps=accumulation, train_batch_size=global_batch)
        return {"world_size": [state["world_size"], world], "zero_stage": [state["zero_stage"], stage],
                "accumulation": [state["accumulation"], accumulation], "micro_batch": [state["micro_batch"], micro],
                "global_batch": global_batch}

    def _resume(self) -> RunState:
        if self.checkpoint is None:
            return RunState()
        directory, tag, state = self.checkpoint
        # Checked before any tensor is loaded: a different adapter would fail deep in DeepSpeed otherwise.
        saved = state.get("adapter_config")
        if saved is not None:  # read through today's config: a retired key is not a change of adapter
            try:
                saved = CLoRAEConfig.from_dict(saved).to_dict()
            except AdapterConfigError as e:
                raise TrainingError(f"--resume: the checkpoint's adapter config: {e}") from None
        current = self.adapter.to_dict() if self.adapter else None
        if saved != current:
            diff = sorted(k for k in set(saved or {}) | set(current or {})
                          if (saved or {}).get(k) != (current or {}).get(k))
            raise TrainingError(f"--resume: the checkpoint was trained with a different adapter config ({diff})")
        if state.get("precision", self.precision) != self.precision:
            raise TrainingError(f"--resume: the checkpoint trained in {state['precision']}, this run would train in "
                                f"{self.precision} (this machine or the DeepSpeed config differs): resume where the "
                                "precision is the same, or start a new run")
        if state.get("datasets") != self.train_datasets:
            raise TrainingError(f"--resume: the checkpoint trained {state.get('datasets')}, this run "
                                f"{self.train_datasets}")
        self.aml.load_state_dict(state["aml"])
        position = state["batch_in_epoch"]
        if self.rescale is None:
            self.runner.load(directory, tag)
            if self.is_main:
                log_json(event="resume", step=self.runner.global_step, epoch=state["epoch"], batch_in_epoch=position)
            return RunState(state["epoch"], position, state["best_all"], state["skipped_steps"])
        if not os.path.isfile(os.path.join(directory, tag, PORTABLE_STATE)):
            raise TrainingError(f"--resume at {self.ctx.world_size} ranks, ZeRO-{self.rescale['zero_stage'][1]}: "
                                f"{directory}/{tag} was saved at {state['world_size']} ranks, ZeRO-"
                                f"{state['zero_stage']}, and holds no {PORTABLE_STATE} (written by this version's "
                                "checkpoints): resume it as it was saved")
        digest = self.runner.load_portable(os.path.join(directory, tag), self.config.seed)
        old_accumulation, accumulation = self.rescale["accumulation"]
        steps_in_epoch = position // old_accumulation
        position = steps_in_epoch * accumulation  # micro-batches per rank of the new stream skipped
        if self.is_main:
            micro, world = self.rescale["micro_batch"][1], self.ctx.world_size
            log_json(event="resume", step=self.runner.global_step, epoch=state["epoch"], batch_in_epoch=position,
                     **self.rescale, state_digest=digest,
                     data=f"epoch {state['epoch']}'s sample stream is drawn anew for {world} ranks (streams are seeded "
                          f"per rank and worker): its first {position} micro-batches per rank "
                          f"({position * micro * world} samples) are skipped, the {steps_in_epoch * self.rescale['global_batch']} "
                          f"samples the old ranks read in this epoch are not tracked (some may be read again)")
        return RunState(state["epoch"], position, state["best_all"], state["skipped_steps"])
