"""Tiny training recipes, and a callback that interrupts a run."""

import dataclasses

from transformers import TrainerCallback

from pmod.pipelines.recipe import TrainConfig

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _config(data, out, **overrides) -> TrainConfig:
    """A tiny run's recipe; keyword arguments that are not TrainConfig fields are trainer (TrainingArguments)
    settings."""
    path, folder = data
    trainer = {"learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_steps": 8, "logging_steps": 1,
               "save_steps": 4, "warmup_steps": 0, "report_to": []}
    trainer.update({k: overrides.pop(k) for k in list(overrides) if k not in FIELDS})
    values = {"output_dir": str(out), "tiny_model": {"num_layers": 4, "hidden_size": 64}, "pmod": {},
              "data_path": str(path), "image_folder": str(folder), "trainer": trainer}
    return TrainConfig(**{**values, **overrides})


class StopAfter(TrainerCallback):
    """Stops a run after ``step`` optimizer steps with a checkpoint, as a kill between two saves would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_save = True
        return control
