"""The transformers `Trainer` with p-MoD's extras: separate router and projector learning rates, length-grouped
batches from cheap estimates, routing statistics in the logs, skipped-record counts, checkpoints resumed through
``from_pretrained``, and runs stopped (never saved) when the loss, a gradient or a weight stops being finite.
Also the rule of which part of a model a parameter belongs to, which freezing and the optimizer groups share.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..data.records import SKIP_KEY
from ..errors import CheckpointError, PModInputError, PModTrainingError
from ..loading import check_loaded_weights

logger = logging.getLogger(__name__)

RESUME_ADVICE = ("delete that folder to resume from an earlier checkpoint, or set resume: false (override "
                 "resume=false) to start over")

# where each family keeps its vision tower and its projector (the modules that map vision features to the decoder)
_PROJECTORS = ("multi_modal_projector",  # LLaVA family, InternVL, Gemma 3, Mistral 3
               ".visual.merger.", ".visual.deepstack_merger_list.",  # Qwen2-VL / Qwen2.5-VL; Qwen3-VL's DeepStack
               ".connector.")  # SmolVLM / Idefics3
_VISION_TOWERS = ("vision_tower", ".visual.", ".vision_model.")  # ...; Qwen-VL; SmolVLM / Idefics3


def model_part(name: str) -> str:
    """The part a parameter belongs to: "projector", "vision_tower", "router", "image_newline" or "language_model"
    (names as ``named_parameters`` gives them, also under PEFT's wrappers)."""
    dotted = "." + name  # Qwen-VL's parts sit at model.visual (ForConditionalGeneration) or visual (Model)
    if any(key in dotted for key in _PROJECTORS):
        return "projector"
    if any(key in dotted for key in _VISION_TOWERS):
        return "vision_tower"
    if ".router." in name:
        return "router"
    return "image_newline" if "image_newline" in name else "language_model"


def _is_projector(name: str) -> bool:
    return model_part(name) == "projector"


class PModTrainer(Trainer):
    """`Trainer` with a router learning rate, cheap length grouping, routing statistics and skip counts."""

    def __init__(self, *args, router_learning_rate: float | None = None, projector_learning_rate: float | None = None,
                 group_lengths: list[int] | None = None, log_routing_per_layer: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_learning_rate = router_learning_rate
        self.projector_learning_rate = projector_learning_rate
        self.group_lengths = group_lengths
        self.log_routing_per_layer = log_routing_per_layer
        self.skipped_records = 0
        self._routing_sums: dict[int, torch.Tensor] = {}  # layer -> [kept, targets, weight sum]

    def _get_train_sampler(self, train_dataset=None):
        if self.group_lengths is None:
            return (super()._get_train_sampler(train_dataset) if train_dataset is not None
                    else super()._get_train_sampler())
        return _EpochLengthGroupedSampler(
            self.args.train_batch_size * self.args.gradient_accumulation_steps, self.group_lengths, self.args.seed
        )

    def create_optimizer(self, model=None):
        special = (self.router_learning_rate, self.projector_learning_rate)
        if all(lr is None for lr in special) or self.optimizer is not None:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))

        def group(weight_decay: float, lr: float | None) -> dict[str, Any]:
            return {"params": [], "weight_decay": weight_decay, **({} if lr is None else {"lr": lr})}

        # a fixed order (the optimizer state of a checkpoint is matched to the groups by position)
        groups = [group(self.args.weight_decay, None), group(0.0, None), group(0.0, self.router_learning_rate),
                  group(self.args.weight_decay, self.projector_learning_rate), group(0.0, self.projector_learning_rate)]
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                if self.router_learning_rate is not None and ".router." in name:
                    index = 2
                else:
                    index = 0 if name in decay else 1
                    if self.projector_learning_rate is not None and _is_projector(name):
                        index += 3
                groups[index]["params"].append(param)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
        return self.optimizer

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not isinstance(target, PreTrainedModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # save_pretrained writes multimodal models in the original key layout, and Trainer reloads checkpoints
        # with a plain load_state_dict that does not rename them back (huggingface/transformers#43701), which
        # would resume from random weights; from_pretrained renames correctly.
        logger.info("loading model weights from %s", resume_from_checkpoint)
        dtype = next(target.parameters()).dtype
        try:
            saved, info = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype, output_loading_info=True)
        except Exception as exc:  # OSError, RuntimeError (size mismatch), safetensors' own error, ...
            raise PModInputError(f"cannot load the weights of checkpoint {resume_from_checkpoint} "
                                 f"({type(exc).__name__}: {exc}); {RESUME_ADVICE}") from exc
        # from_pretrained fills missing weights with random ones: resuming would silently train from those
        try:
            check_loaded_weights(saved, info, f"checkpoint {resume_from_checkpoint}", advice=RESUME_ADVICE)
            target.load_state_dict(saved.state_dict(), strict=True)
        except CheckpointError as exc:  # an input error of the run, as the other checks of its checkpoints
            raise PModInputError(str(exc)) from exc
        except RuntimeError as exc:
            raise PModInputError(
                f"checkpoint {resume_from_checkpoint} does not match the model being trained: {exc}; {RESUME_ADVICE}"
            ) from exc

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One device sync per micro-batch (Trainer makes the same for its NaN filter): a non-finite loss stops the
        # run before its gradients reach the weights, instead of being logged as the previous average.
        if not torch.isfinite(loss).all():
            raise PModTrainingError(
                f"training stopped at step {self.state.global_step + 1}: the loss is {loss.float().mean().item()}. "
                f"{DIVERGED_ADVICE}"
            )
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model (and processor), refusing weights that are not finite (checkpoints and the final model)."""
        where = output_dir or self.args.output_dir
        bad = non_finite_parameters(self.model)
        if bad:
            raise PModTrainingError(
                f"refusing to save a model with non-finite weights ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}) to {where} at step {self.state.global_step}. {DIVERGED_ADVICE}"
            )
        super().save_model(output_dir, _internal_call=_internal_call)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop(SKIP_KEY, None)
        if skipped is not None:
            self.skipped_records += int(skipped)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if model.training:
            self._accumulate_routing(model)
        return result

    @torch.no_grad()
    def _accumulate_routing(self, model) -> None:
        inner = self.accelerator.unwrap_model(model)
        routed = inner.routed_layers() if hasattr(inner, "routed_layers") else {}
        rows, indices = [], []
        for idx, layer in routed.items():
            r = getattr(layer, "last_routing", None)
            if r is None:
                continue
            weight = layer.router_weight(r.router_logits[r.target])
            rows.append(torch.stack([r.selected.sum().float(), r.target.sum().float(), weight.sum().float()]))
            indices.append(idx)
        if rows:
            stats = torch.stack(rows).cpu()  # (layers, 3), one device sync per step
            for idx, row in zip(indices, stats):
                self._routing_sums[idx] = self._routing_sums.get(idx, torch.zeros(3)) + row

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._routing_sums and "loss" in logs:
            kept, weights = [], []
            for idx, (n_kept, n_target, w_sum) in sorted(self._routing_sums.items()):
                if n_target > 0:
                    kept.append(float(n_kept / n_target))
                    weights.append(float(w_sum / n_target))
                    if self.log_routing_per_layer:
                        logs[f"routing/kept_fraction/layer_{idx}"] = round(kept[-1], 4)
                        logs[f"routing/router_weight/layer_{idx}"] = round(weights[-1], 4)
            if kept:
                logs["routing/kept_fraction"] = round(sum(kept) / len(kept), 4)
                logs["routing/router_weight"] = round(sum(weights) / len(weights), 4)
            self._routing_sums = {}
        if self.skipped_records and "loss" in logs:
            logs["skipped_records"] = self.skipped_records
        super().log(logs, *args, **kwargs)


class _EpochLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order that is a function of (seed, epoch), so a resumed run sees the same batches
    (accelerate calls ``set_epoch`` on the sampler at the start of every epoch)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator = torch.Generator().manual_seed(self.seed + epoch)


DIVERGED_ADVICE = (
    "Try a lower learning rate (trainer.learning_rate, router_learning_rate) or a longer warmup "
    "(trainer.warmup_steps), and check the data and the settings (pmod, model_name_or_path); nothing from this step "
    "was saved. Start again with resume=false or another output_dir"
)


def non_finite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding NaN or infinity (one device sync for the whole model)."""
    named = [(n, p) for n, p in model.named_parameters() if p.numel()]  # ZeRO-3 partitions are empty here
    if not named:
        return []
    device = named[0][1].device
    finite = torch.stack([torch.isfinite(p.detach()).all().to(device) for _, p in named]).tolist()
    return [n for (n, _), ok in zip(named, finite) if not ok]


class FiniteGradients(TrainerCallback):
    """Stops training before an optimizer step whose gradients hold NaN or infinity (the loss can be finite
    while its gradient is not); checked on the gradients themselves, so it holds whatever max_grad_norm is.
    Not used with DeepSpeed and FSDP, whose gradients are kept in their own (sharded) buffers."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:  # fp16 loss scaling overflows now and then by design, and skips those steps itself
            return control
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:
            return control
        device = grads[0].device
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) for g in grads])
        norm = float(torch.linalg.vector_norm(norms))  # one device sync
        if not math.isfinite(norm):
            raise PModTrainingError(
                f"training stopped at step {state.global_step + 1}: the gradient norm is {norm} (a gradient holds "
                f"NaN or infinity). {DIVERGED_ADVICE}"
            )
        return control
