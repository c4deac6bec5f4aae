"""lmms-eval model ``pmod``: evaluate p-MoD models with lmms-eval (0.7.x).

    lmms-eval eval --model pmod --model_args pretrained=DIR --tasks gqa,textvqa_val --batch_size 8

lmms-eval finds the model through the ``lmms_eval.models`` entry point that pmod's package metadata declares
(`manifest`). ``model_args``:

    pretrained           a saved p-MoD model, or a dense LLaVA / LLaVA-NeXT / Llama / Qwen2 / Mistral checkpoint
    schedule, average_ratio, max_ratio, min_ratio, constant_start, constant_end, alpha, beta, targets,
    routed_layers, ...   `pmod.PModConfig` fields: convert a dense checkpoint with these settings (routers at zero).
                         A list is written as JSON: schedule='[1.0,0.5,...]'. Not allowed for a p-MoD checkpoint.
    dense=True           evaluate a dense checkpoint as it is (the baseline), without converting it
    device, dtype        default cuda (cuda:LOCAL_RANK under `accelerate launch`) and float16, else cpu and float32;
                         dtype=auto keeps the checkpoint's dtype
    attn_implementation  sdpa (default) or eager
    chat_template        vicuna_v1, a template string or a file; default: the processor's own template, else vicuna_v1
    max_new_tokens       used when a task does not set it (default 128)

Generation is batched (``--batch_size``, left padding, the p-MoD KV cache); a task's ``until`` strings cut the
answers. After each batch of requests the realised prefill FLOP ratio and vision KV ratio (p-MoD over dense,
`pmod.efficiency.realized_cost`) and the KV-cache bytes against a dense cache are logged, overall and per task,
and recorded with lmms-eval's generation metrics, so they appear under ``"throughput"`` in the results file
(``avg_pmod_flops_ratio``, ``avg_pmod_kv_ratio``, ``avg_pmod_flops_ratio/<task>``, ...) next to the scores.
`PMod.efficiency` holds the same figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from .config import PModConfig
from .conversation import IMAGE_PLACEHOLDER, VICUNA_V1_TEMPLATE, render, resolve_chat_template, to_messages
from .errors import PModConfigError, PModInputError
from .evaluate import BatchOutput, generate_batch

logger = logging.getLogger(__name__)

MODEL_NAME = "pmod"
_PMOD_OPTIONS = {f.name for f in dataclasses.fields(PModConfig)}
# Generation settings a task may give that are passed to model.generate; others are ignored (with a note).
_GENERATE_KEYS = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "num_beams",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "suppress_tokens",
}


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: registers model name ``pmod`` -> `PMod` (an lmms-eval ModelManifest)."""
    # Imported here, not at the top: lmms_eval.models loads the entry points while it is being imported, so a
    # top-level import would make importing this module first a circular import that drops the registration.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.PMod")


def _eval_logger():
    try:  # lmms-eval configures loguru for its console output; python logging is usually silent there
        from loguru import logger as loguru_logger

        return loguru_logger
    except ImportError:  # pragma: no cover - loguru is an lmms-eval dependency
        return logger


def _parse_option(name: str, value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise PModConfigError(f"model_args {name}={value!r} is not a JSON list: {exc}") from exc
    return value


class _CostLog:
    """Per-task realised costs collected over the requests of a run."""

    def __init__(self) -> None:
        self.by_task: dict[str, dict[str, list[float]]] = {}
        self.new_tokens = 0
        self.seconds = 0.0

    def add(
        self, task: str, flops: Sequence[float] | None, kv: Sequence[float] | None, kv_cache: float | None, rows: int
    ) -> None:
        entry = self.by_task.setdefault(task, {"flops_ratio": [], "kv_ratio": [], "kv_cache_ratio": []})
        entry["flops_ratio"].extend(flops or [])
        entry["kv_ratio"].extend(kv or [])
        if kv_cache is not None:
            entry["kv_cache_ratio"].extend([kv_cache] * rows)  # weight a batch by its rows

    def summary(self) -> dict[str, Any]:
        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        keys = ("flops_ratio", "kv_ratio", "kv_cache_ratio")
        overall = {k: mean([v for e in self.by_task.values() for v in e[k]]) for k in keys}
        return {
            **overall,
            "n": sum(len(e["flops_ratio"]) for e in self.by_task.values()),
            "by_task": {t: {k: mean(v) for k, v in e.items()} for t, e in self.by_task.items()},
        }


class PMod(lmms):
    """lmms-eval model for p-MoD checkpoints (and dense ones converted on load). See the module docstring."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str = "sdpa",
        chat_template: str | None = None,
        max_new_tokens: int = 128,
        dense: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        from .models import load_processor

        unknown = sorted(set(options) - _PMOD_OPTIONS)
        if unknown:
            raise PModConfigError(
                f"unknown model_args {unknown} for model {MODEL_NAME!r}; accepted: pretrained, device, dtype, "
                f"batch_size, attn_implementation, chat_template, max_new_tokens, dense, and the p-MoD settings "
                f"{sorted(_PMOD_OPTIONS)}"
            )
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError) as exc:
            raise PModConfigError(f"batch_size must be a positive integer, got {batch_size!r}") from exc
        if self.batch_size_per_gpu < 1:
            raise PModConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.max_new_tokens = int(max_new_tokens)

        # Data parallel under `accelerate launch` / torchrun: lmms-eval shards the requests by rank.
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = world_size
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if device is None or (world > 1 and str(device).startswith("cuda")):
            # Under `accelerate launch` every process takes its own GPU, whatever `device` says.
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if dtype is None:
            torch_dtype: Any = torch.float16 if self._device.type == "cuda" else torch.float32
        elif dtype == "auto":
            torch_dtype = "auto"
        elif isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
            torch_dtype = getattr(torch, dtype)
        else:
            raise PModConfigError(f"dtype must be auto, float16, bfloat16 or float32, got {dtype!r}")

        self.pretrained = str(pretrained)
        load_kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
        settings = {k: _parse_option(k, v) for k, v in options.items()}
        if dense:
            if settings:
                raise PModConfigError(f"dense=True evaluates the checkpoint as it is: drop {sorted(settings)}")
            self._model = _load_dense(self.pretrained, **load_kwargs)
        else:
            from .models import load_model

            self._model = load_model(self.pretrained, PModConfig(**settings) if settings else None, **load_kwargs)
        self._model.to(self._device).eval()

        self.processor = load_processor(self.pretrained, need_images=False)  # local video-model folders load without torchvision too
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if chat_template is not None:
            self.processor.chat_template = resolve_chat_template(chat_template)
        elif not getattr(self.processor, "chat_template", None) and not getattr(tokenizer, "chat_template", None):
            _eval_logger().warning(f"{self.pretrained} has no chat template: using the LLaVA-1.5 (Vicuna v1) format")
            self.processor.chat_template = VICUNA_V1_TEMPLATE
        self._costs = _CostLog()  # the whole run, for `efficiency`
        self._unreported = _CostLog()  # since the last report to lmms-eval
        _eval_logger().info(
            f"pmod: loaded {type(self._model).__name__} from {self.pretrained} on {self._device} "
            f"({'dense baseline' if dense else 'p-MoD'}), batch size {self.batch_size_per_gpu}"
        )

    # ------------------------------------------------------------------ properties lmms-eval reads
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def efficiency(self) -> dict[str, Any]:
        """Realised cost so far: mean flops_ratio, kv_ratio, kv_cache_ratio (None for a dense model), n, by_task."""
        return self._costs.summary()

    # ------------------------------------------------------------------ prompts
    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        try:
            return self.task_dict[task][split][doc_id]
        except (KeyError, IndexError) as exc:
            raise PModInputError(f"no document {doc_id} in task {task!r} split {split!r}") from exc

    def _visuals(self, doc_to_visual: Callable | None, doc: Any) -> list[Any]:
        return _as_images(doc_to_visual(doc) if doc_to_visual is not None else None)

    def _prompt(self, context: str, n_images: int, doc_id: Any) -> str:
        """The rendered prompt for a task's context: one image placeholder per image, then the chat template."""
        text = context
        if n_images and IMAGE_PLACEHOLDER not in text:
            text = "\n".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + text  # as LLaVA's own evaluation does
        record = {
            "id": doc_id,
            "image": [f"visual-{i}" for i in range(n_images)] or None,
            "conversations": [{"from": "human", "value": text}],
        }
        return render(self.processor, to_messages(record), add_generation_prompt=True)

    def _generate_kwargs(self, gen_kwargs: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
        gen = dict(gen_kwargs or {})  # requests share one dict: never change it
        until = gen.pop("until", None)
        if isinstance(until, str):
            until = [until]
        elif until is None:
            until = []
        elif not isinstance(until, (list, tuple)):
            raise PModInputError(f"gen_kwargs 'until' must be a string or a list, got {type(until).__name__}")
        kwargs = {k: v for k, v in gen.items() if k in _GENERATE_KEYS and v is not None}
        ignored = sorted(set(gen) - _GENERATE_KEYS)
        if ignored:
            logger.debug("ignoring generation settings %s", ignored)
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        temperature = float(kwargs.get("temperature", 0) or 0)
        if "do_sample" not in kwargs:
            kwargs["do_sample"] = temperature > 0
        if not kwargs["do_sample"]:
            for k in ("temperature", "top_p", "top_k"):
                kwargs.pop(k, None)
        kwargs["max_new_tokens"] = int(kwargs["max_new_tokens"])
        return kwargs, [s for s in until if s]

    @staticmethod
    def _cut(text: str, until: Sequence[str]) -> str:
        for stop in until:
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
        return text.strip()

    def _run(self, task: str, prompts: list[str], images: list[list[Any]], kwargs: dict[str, Any]) -> BatchOutput:
        kwargs = dict(kwargs)
        max_new_tokens = kwargs.pop("max_new_tokens")
        out = generate_batch(self._model, self.processor, prompts, images, max_new_tokens=max_new_tokens, **kwargs)
        for log in (self._costs, self._unreported):
            log.add(task, out.flops_ratio, out.kv_ratio, out.kv_cache_ratio, len(prompts))
            log.new_tokens += sum(out.new_tokens)
            log.seconds += out.seconds
        return out

    # ------------------------------------------------------------------ lmms API
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or the task's sampling) answers, in batches of requests with the same task and settings."""
        from tqdm.auto import tqdm

        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            key = (task, split, json.dumps(gen_kwargs, sort_keys=True, default=str))
            groups.setdefault(key, []).append(i)
        results: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="pmod generating", disable=self.rank != 0)
        for (task, split, _), indices in groups.items():
            kwargs, until = self._generate_kwargs(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts, images = [], []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, _, _ = requests[i].args
                    visuals = self._visuals(doc_to_visual, self._doc(task, split, doc_id))
                    prompts.append(self._prompt(context, len(visuals), doc_id))
                    images.append(visuals)
                out = self._run(task, prompts, images, kwargs)
                for i, text in zip(chunk, out.texts):
                    results[i] = self._cut(text, until)
                bar.update(len(chunk))
        bar.close()
        if requests:
            self._report()
        return [r if r is not None else "" for r in results]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round generation: after each answer the task's ``doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...)`` gives the next round's visuals and context, until it signals
        the end. Returns every round's answer per request."""
        results = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            kwargs, until = self._generate_kwargs(gen_kwargs)
            doc = self._doc(task, split, doc_id)
            visuals = self._visuals(doc_to_visual, doc)
            outputs: list[str] = []
            info = None
            round_idx = 0
            while True:
                if round_idx > 0:
                    visuals, context, terminal, previous, info = doc_to_text(
                        doc, previous_output=outputs, round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(previous) if previous is not None else outputs
                    if terminal:
                        break
                    visuals = _as_images(visuals)
                out = self._run(task, [self._prompt(context, len(visuals), doc_id)], [visuals], kwargs)
                outputs.append(self._cut(out.texts[0], until))
                round_idx += 1
            results.append(outputs)
        if requests:
            self._report()
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the log-probabilities of each continuation's tokens after its prompt, and whether greedy
        decoding would produce exactly those tokens. The continuation is tokenized on its own and appended
        to the prompt's tokens (the lm-evaluation-harness convention)."""
        from tqdm.auto import tqdm

        from .efficiency import realized_cost
        from .evaluate import _is_pmod

        tokenizer = self.tokenizer
        results = []
        for req in tqdm(requests, desc="pmod log-likelihood", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            continuation = target if isinstance(target, str) else target(doc)
            visuals = self._visuals(doc_to_visual, doc)
            prompt = self._prompt(context, len(visuals), doc_id)
            if visuals:
                enc = self.processor(text=[prompt], images=visuals, return_tensors="pt")
            else:
                enc = self.processor(text=[prompt], return_tensors="pt")
            cont_ids = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if cont_ids.shape[1] == 0:
                results.append((0.0, True))
                continue
            n_prompt = enc["input_ids"].shape[1]
            inputs = {k: v for k, v in dict(enc).items() if isinstance(v, torch.Tensor)}
            inputs["input_ids"] = torch.cat([enc["input_ids"], cont_ids], dim=1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            inputs = {k: v.to(self._device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
            with torch.no_grad():
                logits = self._model(**inputs, use_cache=False).logits[0]
            # Position t predicts token t + 1: the continuation is scored by the logits before each of its tokens.
            logprobs = torch.log_softmax(logits[n_prompt - 1 : -1].float(), dim=-1)
            tokens = cont_ids[0].to(logprobs.device)
            total = logprobs.gather(1, tokens[:, None]).sum().item()
            greedy = bool((logprobs.argmax(dim=-1) == tokens).all())
            results.append((total, greedy))
            if _is_pmod(self._model):
                cost = realized_cost(self._model)
                for log in (self._costs, self._unreported):
                    log.add(task, cost.flops_ratio, cost.kv_ratio, None, 1)
        if requests:
            self._report()
        return results

    # ------------------------------------------------------------------ reporting
    def _report(self) -> None:
        """Log the realised costs of the requests since the last report and record them with lmms-eval's
        generation metrics, which the results file carries under "throughput" (averaged over reports)."""
        log, self._unreported = self._unreported, _CostLog()
        summary = log.summary()
        extra: dict[str, float] = {}
        for key in ("flops_ratio", "kv_ratio", "kv_cache_ratio"):
            if summary[key] is not None:
                extra[f"pmod_{key}"] = summary[key]
            for task, values in summary["by_task"].items():
                if values[key] is not None:
                    extra[f"pmod_{key}/{task}"] = values[key]
        if extra:  # a dense model skips nothing and has no ratios
            line = ", ".join(f"{k} {v:.4f}" for k, v in extra.items())
            _eval_logger().info(f"p-MoD realised cost (p-MoD / dense, {summary['n']} examples): {line}")
            logger.info("p-MoD realised cost (p-MoD / dense, %d examples): %s", summary["n"], line)
        try:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # an lmms-eval without generation metrics: the log line above is the record
            return
        if log.seconds > 0 or extra:
            log_metrics(
                total_elapsed_time=log.seconds,
                total_gen_tokens=log.new_tokens,
                avg_speed=log.new_tokens / log.seconds if log.seconds > 0 else 0.0,
                additional_metrics=extra,
            )


def _as_images(visuals: Any) -> list[Any]:
    """A task's visuals as RGB PIL images ([] for a text-only document)."""
    from PIL import Image

    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = []
    for v in visuals:
        if v is None:
            continue
        if not isinstance(v, Image.Image):
            raise PModInputError(
                f"the {MODEL_NAME!r} model handles image and text tasks; got a {type(v).__name__} visual "
                "(video and audio tasks are not supported)"
            )
        images.append(v.convert("RGB"))
    return images


def _load_dense(path: str, **kwargs: Any) -> Any:
    from .models import load_pretrained

    model = load_pretrained(path, **kwargs)
    if type(model).__name__.startswith("PMod"):
        raise PModConfigError(f"dense=True needs a dense checkpoint; {path} is a p-MoD model")
    return model
