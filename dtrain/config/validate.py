"""The range and choice checks that types cannot express, run on every loaded config.

Each failure is a one-line ConfigError naming the key, the value and what is allowed; never an assert
(stripped by python -O).
"""

from __future__ import annotations

import math
from typing import Sequence

from dtrain.config.choices import (BACKENDS, CATCHABLE_SIGNALS, DATASETS, DEVICES, GRAD_COMPRESSIONS, LOSSES,
                                   METRICS, MODEL_INITS, MODELS, MONITOR_MODES, ON_NONFINITE, OPTIMIZERS, PRECISIONS,
                                   PROGRESS, SAMPLINGS, SCHEDULES, STRATEGIES, TOKEN_DTYPES)
from dtrain.config.schema import Config, OptimConfig
from dtrain.errors import ConfigError


def _check(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    _check(value in choices, key, value, " | ".join(choices))


def validate(cfg: Config) -> None:
    d, m, o, s, t, lg = cfg.data, cfg.model, cfg.optim, cfg.sched, cfg.train, cfg.log
    _check(d.name in DATASETS or ":" in d.name, "data.name", d.name,
           f"{' | '.join(DATASETS)} | a factory 'package.module:function'")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an integer >= 1")
    _check(d.num_workers >= 0, "data.num_workers", d.num_workers, "an integer >= 0")
    _check(d.train_size >= 1, "data.train_size", d.train_size, "an integer >= 1")
    _check(d.eval_size >= 1, "data.eval_size", d.eval_size, "an integer >= 1")
    _check(d.num_features >= 1, "data.num_features", d.num_features, "an integer >= 1")
    _check(d.num_classes >= 2, "data.num_classes", d.num_classes, "an integer >= 2")
    _check(d.block_size >= 1, "data.block_size", d.block_size, "an integer >= 1")
    _choice("data.sampling", d.sampling, SAMPLINGS)
    _choice("data.token_dtype", d.token_dtype, TOKEN_DTYPES)
    _check(bool(d.path), "data.path", d.path, "a folder holding train.bin and val.bin (or .npy)")
    _check(d.fast_path or not d.device_resident, "data.device_resident", d.device_resident,
           "false with data.fast_path=false (device-resident data is read by the fast path)")

    _check(m.name in MODELS or ":" in m.name, "model.name", m.name,
           f"{' | '.join(MODELS)} | a factory 'package.module:function'")
    _check(all(h >= 1 for h in m.hidden), "model.hidden", m.hidden, "a list of integers >= 1")
    _choice("model.init", m.init, MODEL_INITS)
    _check(all(bool(g) for g in m.freeze), "model.freeze", m.freeze, "a list of non-empty globs")
    _check(cfg.loss.name in LOSSES or ":" in cfg.loss.name, "loss.name", cfg.loss.name,
           f"{' | '.join(LOSSES)} | a function 'package.module:function'")
    for i, metric in enumerate(cfg.loss.metrics):
        _check(metric in METRICS or ":" in metric, f"loss.metrics[{i}]", metric,
               f"{' | '.join(METRICS)} | a function 'package.module:function'")

    _choice("optim.name", o.name, OPTIMIZERS)
    # A setting the chosen optimizer ignores is almost always a mistake (e.g.
    # momentum=0.95 left over after switching to adam); refuse it rather than
    # train with something other than what the config says.
    defaults = OptimConfig()
    other_keys = ("momentum", "dampening", "nesterov") if o.name != "sgd" else ("betas", "eps")
    applies_to = "sgd only" if o.name != "sgd" else "adam and adamw only"
    for name in other_keys:
        value, default = getattr(o, name), getattr(defaults, name)
        _check(value == default, f"optim.{name}", value,
               f"the default {default!r} with optim.name={o.name} (optim.{name} applies to {applies_to})")
    _check(o.lr >= 0, "optim.lr", o.lr, "a number >= 0")
    _check(o.momentum >= 0, "optim.momentum", o.momentum, "a number >= 0")
    _check(0 <= o.dampening <= 1, "optim.dampening", o.dampening, "a number in [0, 1]")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a number >= 0")
    if o.nesterov:
        _check(o.momentum > 0 and o.dampening == 0, "optim.nesterov", o.nesterov,
               "true only with optim.momentum > 0 and optim.dampening = 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas,
           "two numbers in [0, 1)")
    _check(o.eps > 0, "optim.eps", o.eps, "a number > 0")
    seen: dict[str, int] = {}
    for i, g in enumerate(o.param_groups):
        key = f"optim.param_groups[{i}]"
        _check(bool(g.params), f"{key}.params", g.params, "a non-empty glob over parameter names")
        # Identical globs always overlap; caught here, before any process starts.
        _check(g.params not in seen, f"{key}.params", g.params,
               f"a glob different from optim.param_groups[{seen.get(g.params)}].params")
        seen[g.params] = i
        _check(g.lr is None or g.lr >= 0, f"{key}.lr", g.lr, "a number >= 0")
        _check(g.weight_decay is None or g.weight_decay >= 0, f"{key}.weight_decay",
               g.weight_decay, "a number >= 0")

    _choice("sched.name", s.name, SCHEDULES)
    _check(s.warmup_steps >= 0, "sched.warmup_steps", s.warmup_steps, "an integer >= 0")
    _check(s.step_size >= 1, "sched.step_size", s.step_size, "an integer >= 1")
    _check(0 < s.gamma <= 1, "sched.gamma", s.gamma, "a number in (0, 1]")
    _check(0 <= s.min_lr <= o.lr, "sched.min_lr", s.min_lr, f"a number in [0, optim.lr={o.lr}]")

    _check(t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1")
    _check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps,
           "an integer >= 1, or null for no limit")
    _choice("train.precision", t.precision, PRECISIONS)
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "an integer >= 1")
    _check(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", t.grad_clip,
           "a number > 0, or null for no clipping")
    _choice("train.device", t.device, DEVICES)
    _choice("train.on_nonfinite", t.on_nonfinite, ON_NONFINITE)
    _check(t.max_skipped_steps >= 1, "train.max_skipped_steps", t.max_skipped_steps, "an integer >= 1")

    _choice("dist.backend", cfg.dist.backend, BACKENDS)
    _choice("dist.strategy", cfg.dist.strategy, STRATEGIES)
    _check(cfg.dist.timeout_s >= 1, "dist.timeout_s", cfg.dist.timeout_s, "an integer >= 1")
    _check(cfg.dist.start_timeout_s >= 1, "dist.start_timeout_s", cfg.dist.start_timeout_s, "an integer >= 1")
    _check(cfg.dist.bucket_cap_mb is None or (cfg.dist.bucket_cap_mb > 0 and math.isfinite(cfg.dist.bucket_cap_mb)),
           "dist.bucket_cap_mb", cfg.dist.bucket_cap_mb, "a number of MiB > 0, or null for DDP's default (25)")
    _choice("dist.grad_compression", cfg.dist.grad_compression, GRAD_COMPRESSIONS)
    shard = cfg.dist.shard
    _check(shard == ["auto"] or (bool(shard) and "auto" not in shard and all(g.strip() for g in shard)),
           "dist.shard", shard, "[auto] | a list of class-name globs, e.g. [Block] or ['*Layer']")
    if cfg.dist.strategy == "fsdp2":
        _check(cfg.dist.grad_compression == "none", "dist.grad_compression", cfg.dist.grad_compression,
               "none with dist.strategy=fsdp2 (a DDP hook; fsdp2 reduces in fp32, or in the parameters' dtype)")
        _check(not cfg.dist.find_unused_parameters, "dist.find_unused_parameters", cfg.dist.find_unused_parameters,
               "false with dist.strategy=fsdp2 (a DDP search; fsdp2 reduces each shard unit's gradients as one, so "
               "a model whose ranks leave different parameters unused needs dist.strategy=ddp)")
        _check(cfg.ema.decay is None, "ema.decay", cfg.ema.decay,
               "null with dist.strategy=fsdp2 (the weight average is not sharded yet; use dist.strategy=ddp)")

    _check(lg.every_steps >= 1, "log.every_steps", lg.every_steps, "an integer >= 1")
    _choice("log.progress", lg.progress, PROGRESS)
    _check(lg.peak_tflops is None or (lg.peak_tflops > 0 and math.isfinite(lg.peak_tflops)), "log.peak_tflops",
           lg.peak_tflops, "a number > 0, or null")

    f = cfg.lr_find
    _check(f.start_lr > 0, "lr_find.start_lr", f.start_lr, "a number > 0")
    _check(f.end_lr > f.start_lr, "lr_find.end_lr", f.end_lr, f"a number > lr_find.start_lr={f.start_lr}")
    _check(f.num_steps >= 2, "lr_find.num_steps", f.num_steps, "an integer >= 2")
    _check(0 < f.smoothing <= 1, "lr_find.smoothing", f.smoothing, "a number in (0, 1]")
    _check(f.diverge_factor > 1, "lr_find.diverge_factor", f.diverge_factor, "a number > 1")

    c = cfg.checkpoint
    _check(c.every_steps is None or c.every_steps >= 1, "checkpoint.every_steps", c.every_steps,
           "an integer >= 1, or null for only at the end and on signals")
    _check(c.every_minutes is None or (c.every_minutes > 0 and math.isfinite(c.every_minutes)),
           "checkpoint.every_minutes", c.every_minutes, "a number > 0, or null")
    _check(c.keep >= 1, "checkpoint.keep", c.keep, "an integer >= 1")
    _check(c.stop_grace_s > 0 and math.isfinite(c.stop_grace_s), "checkpoint.stop_grace_s", c.stop_grace_s,
           "a number of seconds > 0")
    for i, name in enumerate(c.signals):
        _check(name in CATCHABLE_SIGNALS, f"checkpoint.signals[{i}]", name, " | ".join(CATCHABLE_SIGNALS))
    _check(c.monitor is None or bool(c.monitor), "checkpoint.monitor", c.monitor, "an eval value's name, or null")
    _choice("checkpoint.mode", c.mode, MONITOR_MODES)
    _check(c.keep_best >= 1, "checkpoint.keep_best", c.keep_best, "an integer >= 1")

    ev, es = cfg.eval, cfg.early_stop
    _check(ev.every_steps is None or ev.every_steps >= 1, "eval.every_steps", ev.every_steps,
           "an integer >= 1, or null for epoch ends only")
    _check(ev.max_batches is None or ev.max_batches >= 1, "eval.max_batches", ev.max_batches,
           "an integer >= 1, or null for the whole eval set")
    _check(es.monitor is None or bool(es.monitor), "early_stop.monitor", es.monitor, "an eval value's name, or null")
    _choice("early_stop.mode", es.mode, MONITOR_MODES)
    _check(es.patience >= 1, "early_stop.patience", es.patience, "an integer >= 1")
    _check(es.min_delta >= 0 and math.isfinite(es.min_delta), "early_stop.min_delta", es.min_delta, "a number >= 0")
    decay = cfg.ema.decay
    _check(decay is None or 0 < decay < 1, "ema.decay", decay, "a number in (0, 1), or null for no EMA")
    for i, cb in enumerate(cfg.callbacks):
        _check(cb.name.count(":") == 1 and all(cb.name.split(":")), f"callbacks[{i}].name", cb.name,
               "a factory 'package.module:Name' returning a dtrain.Callback")
    _check(bool(cfg.resume), "resume", cfg.resume, "auto | never | the path of a checkpoint")
