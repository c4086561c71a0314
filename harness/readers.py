"""Which train keys each setting reads: an optimizer its own hyperparameters, the step schedule
its decay, batch-size scaling its base batch size. Beside harness.config, which refuses a key
set where no trial reads it, and harness.grid, which resets the keys a trial does not read to
their defaults (``normalised``), so that in a sweep mixing settings (``optimizer: [sgd, adam]``
x ``momentum: [0, 0.9]``) Adam is one trial, not two.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

OPTIMIZER_KEYS = {"sgd": ("momentum", "nesterov"), "adam": ("beta_1", "beta_2", "epsilon"),
                  "rmsprop": ("rho", "epsilon")}
SCHEDULE_KEYS = {"constant": (), "step": ("decay_epochs", "decay_factor"), "cosine": ()}


def unread_keys(train) -> set[str]:
    """The keys of ``train`` (a config.TrainConfig) that its optimizer, schedule and scaling do not read."""
    unread = {k for keys in OPTIMIZER_KEYS.values() for k in keys} - set(OPTIMIZER_KEYS[train.optimizer])
    unread |= {k for keys in SCHEDULE_KEYS.values() for k in keys} - set(SCHEDULE_KEYS[train.schedule])
    if train.learning_rate_scaling == "none":
        unread.add("base_batch_size")
    return unread


def normalised(train):
    """``train`` with every key it does not read at its default."""
    defaults = type(train)()
    return dataclasses.replace(train, **{k: getattr(defaults, k) for k in unread_keys(train)})


def _combos(train, blocks) -> list[list]:
    """Per sweep block, every (optimizer, schedule, scaling) one of its trials can have."""
    out = []
    for block in blocks:
        axes = dict(block)
        out.append([dataclasses.replace(train, optimizer=o, schedule=s, learning_rate_scaling=c)
                    for o in axes.get("optimizer", (train.optimizer,)) for s in axes.get("schedule", (train.schedule,))
                    for c in axes.get("learning_rate_scaling", (train.learning_rate_scaling,))])
    return out


def _readers(key: str) -> str:
    names = [f"optimizer '{o}'" for o, keys in OPTIMIZER_KEYS.items() if key in keys]
    names += [f"schedule '{s}'" for s, keys in SCHEDULE_KEYS.items() if key in keys]
    return " or ".join(names) or "learning_rate_scaling linear or sqrt"


def unread_problem(train, raw_train: Mapping[str, Any], blocks) -> str:
    """Why the grid sets a key no trial reads ('' when it does not): a train key must be read by
    some trial of the grid, a swept key by some trial of its block. Also warm-up given both ways."""
    per_block = _combos(train, blocks)
    everywhere = [t for combos in per_block for t in combos]
    for key in sorted(raw_train):
        if all(key in unread_keys(t) for t in everywhere):
            return (f"'train.{key}' is not read by any trial; only {_readers(key)} reads it (optimizer is "
                    f"'{train.optimizer}', schedule '{train.schedule}', learning_rate_scaling "
                    f"'{train.learning_rate_scaling}')")
    for block, combos in zip(blocks, per_block):
        for axis, _ in block:
            if all(axis in unread_keys(t) for t in combos):
                return f"'sweep.{axis}' is not read by any trial of its block; only {_readers(axis)} reads it"
        axes = dict(block)
        if ("warmup_updates" in axes or train.warmup_updates) and ("warmup_epochs" in axes or train.warmup_epochs):
            return "set or sweep 'train.warmup_updates' or 'train.warmup_epochs', not both"
    return ""
