"""Trainer arguments every stage shares, derived from the RunConfig in one place."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from transformers.trainer_callback import PrinterCallback, ProgressCallback

from alignment.launch.backends import arm_engine
from alignment.records.cache import adding_derived_files
from alignment.stages.batching import TokenTally, epoch_callback, length_sampler, padded_lengths
from alignment.config.schema import RunConfig
from alignment.data import PreparedData, prepare
from alignment.models.modeling import load_policy, load_tokenizer, lora_config, uses_cuda
from alignment.plan.resolved import plan_of
from alignment.runtime.preemption import phase_boundary
from alignment.runtime.ranks import is_main_process, main_process_first
from alignment.records.rundir import RunDir, write_json
from alignment.models.start import StartingPoint
from alignment.records.trackers import report_to
from alignment.records.tracking import MetricsProgress


def trainer_arguments(cfg: RunConfig, run: RunDir, has_eval: bool) -> dict[str, Any]:
    stage, plan = cfg.stage, plan_of(cfg)
    precision = plan.precision
    evaluate_during_training = has_eval and stage.eval_steps is not None
    return dict(
        output_dir=str(run.checkpoints),
        run_name=run.path.name,
        seed=cfg.seed,
        data_seed=cfg.seed,
        learning_rate=cfg.learning_rate,
        max_steps=stage.max_steps,
        num_train_epochs=stage.num_train_epochs,
        per_device_train_batch_size=stage.per_device_train_batch_size,
        per_device_eval_batch_size=stage.per_device_eval_batch_size,
        gradient_accumulation_steps=plan.batch.accumulation,
        lr_scheduler_type=stage.lr_scheduler_type,
        warmup_steps=stage.warmup_ratio,  # transformers 5 reads a value below 1 as a fraction of the steps
        weight_decay=stage.weight_decay,
        max_grad_norm=stage.max_grad_norm,
        optim=stage.optim,
        max_length=stage.max_length,
        logging_steps=stage.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if evaluate_during_training else "no",
        eval_steps=stage.eval_steps,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=stage.save_total_limit,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        # Without use_cpu, transformers and accelerate may disagree on the device and world size (see
        # notes/distributed-on-cpu.md); say it explicitly whenever no CUDA device is used.
        use_cpu=not uses_cuda(cfg),
        gradient_checkpointing=plan.gradient_checkpointing,  # model.gradient_checkpointing, auto resolved
        gradient_checkpointing_kwargs={"use_reentrant": cfg.model.use_reentrant},
        use_liger_kernel=stage.use_liger_kernel,
        report_to=report_to(cfg),
        # Every trainable parameter takes part in every step (frozen LoRA bases do not require grad), so DDP
        # need not search the graph for unused ones each step.
        ddp_find_unused_parameters=False,
        # Progress bars only on a terminal: CI logs stay readable, metrics go to metrics.jsonl anyway.
        disable_tqdm=not sys.stderr.isatty(),
        dataloader_num_workers=0,
        dataset_num_proc=cfg.dataset.num_proc,
    )


def prepare_data(cfg: RunConfig, run: RunDir, source) -> tuple[Any, PreparedData]:
    """The tokenizer and the stage's checked data, with data_report.json written into the run dir."""
    tokenizer = load_tokenizer(source, cfg.model)
    data = prepare(cfg, tokenizer)
    write_json(run.data_report, data.report)
    return tokenizer, data


def _our_trainer_class(trainer_class, prepared_data: Path | None, batching: str, packed: bool):
    """The TRL trainer class as runs use it.

    - Without TRL's draft model card, which it writes into checkpoints/ at every save (with hub links to
      huggingface.co/None): the run's card is alignment.records.model_card's, in model/README.md.
    - Its tokenization (TRL's private `_prepare_dataset`, which `datasets` caches beside the prepared splits) runs
      under the prepared-data entry's lock: one process tokenizes, concurrent runs wait and reuse, and a cached
      tokenized file that fails verification is removed first, so it is tokenized again (alignment/records/cache.py).
    - With length-aware batching (alignment/stages/batching.py), transformers' length-grouped sampler fed with each
      example's padded length; every training batch's real and computed tokens are counted (`token_tally`).
    """
    class OurTrainer(trainer_class):
        prepared_data_dir = prepared_data
        batching_strategy, packed_row = batching, packed

        def create_model_card(self, *args, **kwargs) -> None:
            return None

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.batching_strategy != "length" or dataset is None:
                return super()._get_train_sampler(train_dataset)
            lengths = padded_lengths(dataset, self.args.max_length)
            self.length_sampler = length_sampler(
                dataset, lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                self.args.data_seed if self.args.data_seed is not None else self.args.seed)
            return self.length_sampler

        def training_step(self, model, inputs, *args, **kwargs):
            self.token_tally.add(inputs, self.packed_row)
            return super().training_step(model, inputs, *args, **kwargs)

        if hasattr(trainer_class, "_prepare_dataset"):
            def _prepare_dataset(self, *args, **kwargs):
                with adding_derived_files(self.prepared_data_dir, is_main_process(), "tokenized data"):
                    return super()._prepare_dataset(*args, **kwargs)
        else:
            # TRL's experimental trainers (ORPO, CPO) tokenize inside __init__ with `datasets.map`, whose cache files
            # land in the prepared-data entry: the same guard, around the whole constructor.
            def __init__(self, *args, **kwargs):
                with adding_derived_files(self.prepared_data_dir, is_main_process(), "tokenized data"):
                    super().__init__(*args, **kwargs)

    OurTrainer.__name__ = OurTrainer.__qualname__ = trainer_class.__name__
    return OurTrainer


def build_trainer(cfg: RunConfig, run: RunDir, start: StartingPoint, callbacks, config_class, trainer_class,
                  trainer_extras: Callable[[PreparedData], dict] | None = None,
                  convert_rows: Callable[[Any], Any] | None = None, packed_row: bool = False, **stage_arguments):
    """Tokenizer, then data (bad rows stop the run before any weights load), then weights, into a TRL trainer.

    trainer_extras(data) gives stage-specific trainer arguments that need the prepared data (DPO's reference).
    convert_rows(split) turns the prepared rows into the ones the trainer reads (KTO: pairs into labelled rows).
    packed_row: the stage computes each batch as one packed row of real tokens (DPO's stage.padding_free).
    """
    with main_process_first():  # rank 0 fills the prepared-data cache; the other ranks then read it
        tokenizer, data = prepare_data(cfg, run, start.tokenizer)
    train_rows, eval_rows = data.train, data.eval
    if convert_rows is not None:
        with main_process_first(), adding_derived_files(data.location, is_main_process(), "converted rows"):
            train_rows = convert_rows(train_rows)
            eval_rows = convert_rows(eval_rows) if eval_rows is not None else None
    phase_boundary(f"{cfg.stage.name}:data_prepared")
    model = load_policy(start, cfg)
    args = config_class(**trainer_arguments(cfg, run, data.eval is not None), **stage_arguments)
    arm_engine(cfg)
    trainer = _our_trainer_class(trainer_class, data.location, plan_of(cfg).batching, packed_row)(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        # A kept parent adapter is already on the model and keeps its own LoRA settings.
        peft_config=None if start.has_adapter else lora_config(cfg.peft),
        callbacks=list(callbacks),
        **(trainer_extras(data) if trainer_extras else {}),
    )
    trainer.token_tally = TokenTally()
    trainer.add_callback(epoch_callback(trainer))
    trainer.remove_callback(PrinterCallback)  # MetricsWriter logs compact lines instead of every dict
    if not args.disable_tqdm:  # a terminal: a bar with the key metrics instead of a printed dict per step
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(MetricsProgress())
    return trainer
