"""The fine-tuning loop on accelerate: one process or many, CPU or GPU.

Each optimizer step sees ``global_batch_tokens`` tokens: the step's sequences are
drawn from a seeded permutation (so the order depends only on the seed and the
step, which makes resuming exact), split across processes and then into
micro-batches with gradient accumulation. The loss is the LM loss plus the
recipe's weights times the routers' load-balance and z-loss terms, each averaged over routers.

Saving and resuming (the checkpoint format) are in :mod:`.checkpoints`; :mod:`.finetune` sets a run up around this.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UpcycleError
from ..files import json_safe
from ..modeling.modeling_upcycle import router_losses
from .checkpoints import Checkpointing, latest_checkpoint
from .recipe import Recipe

FINAL = "final"
MAX_SKIPPED_STEPS = 3  # consecutive steps with a non-finite loss or gradient, skipped, before training stops
# metrics.jsonl names of the loss terms: loss is the weighted sum of lm, distill and hidden (router terms apart)
METRIC_NAMES = {
    "loss": "loss",
    "lm": "lm_loss",
    "aux": "aux_loss",
    "z": "z_loss",
    "distill": "distill_loss",
    "hidden": "hidden_loss",
}


@dataclass
class BatchPlan:
    """How one optimizer step's sequences are spread over processes and micro-batches."""

    sequences_per_step: int
    micro_batch_size: int
    accumulation: int
    world_size: int

    @classmethod
    def from_recipe(cls, recipe: Recipe, world_size: int) -> BatchPlan:
        seq_len, training = recipe.data.seq_len, recipe.training
        if training.global_batch_tokens % seq_len:
            raise UpcycleError(
                f"training.global_batch_tokens {training.global_batch_tokens} is not a multiple of "
                f"data.seq_len {seq_len}; make it one"
            )
        sequences = training.global_batch_tokens // seq_len
        per_pass = training.micro_batch_size * world_size
        if sequences % per_pass:
            raise UpcycleError(
                f"a step's {sequences} sequences do not split into micro-batches of {training.micro_batch_size} "
                f"on {world_size} process(es); "
                "change training.micro_batch_size or training.global_batch_tokens"
            )
        return cls(sequences, training.micro_batch_size, sequences // per_pass, world_size)

    def step_indices(self, step: int, dataset_size: int, seed: int, rank: int) -> list[torch.Tensor]:
        """This rank's micro-batches of dataset indices for ``step``: [accumulation] x [micro_batch_size]."""
        start = step * self.sequences_per_step
        indices = torch.cat(
            [
                _epoch_order(epoch, dataset_size, seed)
                for epoch in range(start // dataset_size, (start + self.sequences_per_step - 1) // dataset_size + 1)
            ]
        )
        offset = start - (start // dataset_size) * dataset_size
        step_ids = indices[offset : offset + self.sequences_per_step]  # [S]
        mine = step_ids.view(self.accumulation, self.world_size, self.micro_batch_size)[:, rank]  # [A, M]
        return list(mine)


def _epoch_order(epoch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def use_cpu() -> bool:
    """Train on the CPU when asked (ACCELERATE_USE_CPU) or when there is no CUDA device.

    accelerate only sets up a multi-process CPU group (gloo) when told it runs on the CPU.
    """
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def process_state():
    """accelerate's process state (rank, world size), created consistently with the Trainer's."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def lr_schedule(optimizer, recipe: Recipe):
    """Linear warmup then cosine decay to ``min_lr``."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    training = recipe.training
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, training.warmup_steps, training.steps, min_lr=training.min_lr
    )


def is_router_parameter(name: str) -> bool:
    """Head routers (MoH, BAM attention), upcycle's MoE FFN routers and Mixtral's."""
    return (
        ".head_router." in name
        or ".mlp.router." in name
        or name.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight"))
    )


def select_trainable(model, recipe: Recipe):
    """Freeze what the recipe does not train; LoRA wraps the model with peft (routers stay fully trainable)."""
    if recipe.trainable == "all":
        return model
    if recipe.trainable == "routers":
        if not any(is_router_parameter(name) for name, _ in model.named_parameters()):
            raise UpcycleError(
                "trainable: routers, but the model has no router parameters (query-norm routers have none); "
                "use trainable: all or lora"
            )
        for name, param in model.named_parameters():
            param.requires_grad = is_router_parameter(name)
        return model
    from peft import LoraConfig, get_peft_model

    lora = recipe.lora
    # Only nn.Linear layers get adapters; modules a conversion created that say so (MHE projections) train fully.
    targets = [
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in lora.target_modules and isinstance(module, torch.nn.Linear)
    ]
    if not targets:
        raise UpcycleError(
            f"lora.target_modules {lora.target_modules} match no linear layer of the model; "
            "name its projections (e.g. o_proj, up_proj)"
        )
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    for name, param in model.named_parameters():
        if is_router_parameter(name):
            param.requires_grad = True
    for module in model.modules():
        if getattr(module, "trains_fully_under_lora", False):
            module.requires_grad_(True)
    return model


def router_term(model, attribute: str) -> torch.Tensor | None:
    """Mean over the routers that set ``attribute`` (``aux_loss``: load balance, ``z_loss``) in the latest forward."""
    losses = router_losses(model, attribute)
    return torch.stack(losses).mean() if losses else None


def router_balance_loss(model) -> torch.Tensor | None:
    """Mean over layers of the routers' load-balance terms from the latest forward."""
    return router_term(model, "aux_loss")


def router_z_loss(model) -> torch.Tensor | None:
    """Mean over expert routers of their z-loss terms from the latest forward."""
    return router_term(model, "z_loss")


def check_stop_after(stop_after: int | None) -> None:
    """``--stop-after`` counts the steps this run trains before it checkpoints and stops: 1 or more."""
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise UpcycleError(
            f"--stop-after {stop_after} is not a number of steps to train; give 1 or more, or leave it out to train "
            "to training.steps"
        )


def json_line(record: dict) -> str:
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def load_model_to_train(model_path: Path, recipe: Recipe):
    """The model to tune in fp32, with the recipe's gradient checkpointing and attention backend, and Mixtral
    routers (BTX) instrumented for the same balance and z-loss terms as upcycle's."""
    from transformers import AutoModelForCausalLM

    import upcycle  # noqa: F401  (registers upcycled classes)

    from ..eval.experts import instrument_mixtral_routers
    from ..modeling.gated_attention import set_attention_backend

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if recipe.training.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    instrument_mixtral_routers(model)
    try:
        set_attention_backend(model, recipe.attention)
    except ValueError as error:  # kernel asked for without Triton or CUDA
        raise UpcycleError(str(error)) from None
    return model


def build_optimizer(model, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: weight decay on matrices, none on vectors (norms, biases, gates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": recipe.training.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.training.lr, betas=recipe.training.adam_betas)


class Trainer(Checkpointing):
    """Runs a recipe: prepare model and data, train, checkpoint, save the final model."""

    def __init__(
        self,
        recipe: Recipe,
        model_path: Path,
        corpus,
        *,
        resume: bool = False,
        stop_after: int | None = None,
        teacher: Path | None = None,
        reference: Path | None = None,
    ):
        from accelerate import Accelerator

        check_stop_after(stop_after)
        self.recipe = recipe
        self.output = Path(recipe.output)
        cpu = use_cpu()
        precision = recipe.training.precision
        mixed = "bf16" if precision == "bf16" or (precision == "auto" and not cpu) else "no"
        self.accelerator = Accelerator(
            mixed_precision=mixed, cpu=cpu, dynamo_backend="inductor" if recipe.training.compile else "no"
        )
        self.plan = BatchPlan.from_recipe(recipe, self.accelerator.num_processes)
        self.corpus, self.model_path = corpus, model_path
        self.stop_after = stop_after
        torch.manual_seed(recipe.training.seed)
        model = load_model_to_train(model_path, recipe)
        self.source_dtype = _config_dtype(model_path)
        self.teacher = None
        if teacher is not None:
            from .distill import Teacher

            # frozen, in the training precision, replicated on every process (each runs its own micro-batches through
            # it)
            vocabulary = model.get_output_embeddings().weight.shape[0]
            dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
            self.teacher = Teacher(teacher, self.accelerator.device, dtype, vocabulary)
        self.reference, self._reference_losses = reference, None
        model = select_trainable(model, recipe)
        optimizer = build_optimizer(model, recipe)
        self.scheduler = lr_schedule(optimizer, recipe)
        # the scheduler is not registered with accelerate: its state goes into trainer_state.json (accelerate pickles
        # it)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self._sharded = self._check_distribution(checkpoints=resume or stop_after is not None)
        self.trainable_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.step = 0
        self._stream = None
        self._skipped: list[int] = []  # the current run of consecutive skipped (non-finite) steps
        if resume:
            self._resume()

    def _check_distribution(self, checkpoints: bool) -> bool:
        """Whether the model is sharded (FSDP), after refusing what upcycle's checkpoints and LoRA merge cannot do
        under accelerate's distributed type (``checkpoints``: this run saves or resumes one)."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        sharded = kind == DistributedType.FSDP
        if sharded and self.recipe.trainable == "lora":
            raise UpcycleError(
                "trainable: lora under FSDP is not supported (merging the adapters on save needs the whole weights on "
                "one process); use trainable: all, or launch without FSDP (DDP: LoRA's optimizer state is small)"
            )
        if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not sharded:
            # accelerate (state.py) turns FSDP on only for GPU-like devices: on the CPU it stays MULTI_CPU (DDP)
            self._print(
                f"warning: the accelerate config asks for FSDP, but accelerate runs it as {kind.value} on "
                f"{self.accelerator.device}: every process holds the whole model and optimizer (DDP); FSDP needs GPUs"
            )
        supported = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU, DistributedType.FSDP)
        if (checkpoints or self.recipe.training.save_every > 0) and kind not in supported:
            raise UpcycleError(
                f"upcycle checkpoints support one process, several (DDP) and FSDP, not {kind.value}; "
                "train without save_every, --stop-after and --resume, or use DDP or FSDP"
            )
        return sharded

    # ---- training ----------------------------------------------------------------------
    def _print(self, text: str) -> None:
        if self.accelerator.is_main_process:
            if getattr(self, "_progress", None) is not None:  # above the progress bar, not inside it
                self._progress.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr, flush=True)

    def _micro_batches(self) -> list[torch.Tensor]:
        """This process's micro-batches for the current step: [accumulation] x [M, T]."""
        train, plan, rank = self.corpus.train, self.plan, self.accelerator.process_index
        if isinstance(train, torch.utils.data.IterableDataset):  # streaming: blocks in corpus order
            if self._stream is None:
                self._stream = iter(train.skip_blocks(self.step * plan.sequences_per_step))
            try:
                blocks = torch.stack(
                    [next(self._stream)["input_ids"] for _ in range(plan.sequences_per_step)]
                )  # [S, T]
            except StopIteration:
                raise UpcycleError(
                    f"the training data ran out at step {self.step}; lower training.steps or add data"
                ) from None
            return list(blocks.view(plan.accumulation, plan.world_size, plan.micro_batch_size, -1)[:, rank])
        ids = plan.step_indices(self.step, len(train), self.recipe.training.seed, rank)
        return [torch.stack([train[int(i)]["input_ids"] for i in micro]) for micro in ids]

    def objective(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch [M, T]: ``lm`` (next-token cross-entropy), and with a teacher
        ``distill`` (KL over the vocabulary per position, chunked) and ``hidden`` (per-layer state matching)."""
        from .distill import AttentionOutputs, chunked_kl, state_matching

        losses = self.recipe.losses
        per_layer = losses.distill_hidden_on if self.teacher is not None and losses.distill_hidden > 0 else None
        recorder = AttentionOutputs(self.model) if per_layer == "attention_outputs" else nullcontext()
        with recorder:
            out = self.model(
                input_ids=batch,
                labels=batch if losses.lm > 0 else None,
                output_hidden_states=per_layer == "hidden_states",
            )
        if losses.lm > 0:
            terms = {"lm": out.loss}
        else:  # logged, not trained on
            with torch.no_grad():
                terms = {
                    "lm": torch.nn.functional.cross_entropy(
                        out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()
                    )
                }
        if self.teacher is not None:
            last, states = self.teacher.states(batch, per_layer)
            if losses.distill > 0:
                terms["distill"] = chunked_kl(
                    out.logits,
                    last,
                    self.teacher.head,
                    temperature=losses.distill_temperature,
                    chunk_tokens=losses.distill_chunk_tokens,
                )
            if per_layer is not None:
                student = recorder.take() if per_layer == "attention_outputs" else list(out.hidden_states[1:])
                terms["hidden"] = state_matching(student, states)
        return terms

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the step's metrics (averaged over processes)."""
        micro_batches = self._micro_batches()
        losses = self.recipe.losses
        weights = {"lm": losses.lm, "distill": losses.distill, "hidden": losses.distill_hidden}
        totals: dict[str, torch.Tensor] = {}
        self.model.train()
        for index, batch in enumerate(micro_batches):
            batch = batch.to(self.accelerator.device)  # [M, T]
            last = index == len(micro_batches) - 1
            with nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    terms = self.objective(batch)
                terms["aux"], terms["z"] = router_balance_loss(self.model), router_z_loss(self.model)
                terms = {name: term for name, term in terms.items() if term is not None}
                objective = sum(weights[name] * term for name, term in terms.items() if name in weights)
                loss = objective + losses.load_balance * terms.get("aux", 0.0) + losses.z_loss * terms.get("z", 0.0)
                self.accelerator.backward(loss / len(micro_batches))
            for name, term in [("loss", objective), *terms.items()]:
                totals[name] = totals.get(name, 0.0) + term.detach().float() / len(micro_batches)
        grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), self.recipe.training.grad_clip))
        names = ["loss", "lm", "aux", "z", *(name for name in ("distill", "hidden") if name in totals)]
        zero = torch.zeros((), device=self.accelerator.device)
        values = self.accelerator.reduce(
            torch.stack([totals.get(name, zero) for name in names]), reduction="mean"
        ).tolist()
        # the reduced losses and the (all-reduced) gradient norm are the same on every process: all skip together
        finite = all(math.isfinite(v) for v in values) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        # a skipped first step: torch warns that the scheduler steps before the optimizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics = {"step": self.step} | {METRIC_NAMES[name]: value for name, value in zip(names, values)}
        return (
            metrics
            | {"lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm}
            | ({} if finite else {"skipped": True})
        )

    def _check_finite(self, metrics: dict) -> None:
        """A skipped step (non-finite loss or gradient) is a warning; ``MAX_SKIPPED_STEPS`` in a row stop training."""
        if not metrics.get("skipped"):
            self._skipped = []
            return
        self._skipped.append(self.step)
        self._print(
            f"warning: step {self.step}: the loss or gradient is not finite (loss {metrics['loss']}, grad norm "
            f"{metrics['grad_norm']}); the step was skipped, weights unchanged"
        )
        if len(self._skipped) >= MAX_SKIPPED_STEPS:
            kept = latest_checkpoint(self.output)
            raise UpcycleError(
                f"training stopped at step {self.step}: the loss or gradient was not finite at steps "
                f"{', '.join(map(str, self._skipped))} (each skipped) and no final model was written; lower "
                f"training.lr or check the data, then start again with --overwrite"
                + (f" or --resume from {kept.name}" if kept is not None else "")
            )

    def _block_losses(self, model, sets: dict[str, torch.Tensor]) -> dict[str, float]:
        """Mean next-token loss of ``model`` on each validation corpus's blocks."""
        result = {}
        for name, blocks in sets.items():
            total = 0.0
            for start in range(0, len(blocks), self.plan.micro_batch_size):
                batch = blocks[start : start + self.plan.micro_batch_size].to(self.accelerator.device)
                with self.accelerator.autocast():
                    total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
            result[name] = total / max(len(blocks), 1)
        return result

    def reference_losses(self) -> dict[str, float]:
        """The reference model's (``compare``, else the teacher) loss on each validation corpus, computed once."""
        if self._reference_losses is None:
            if self.teacher is not None and self.reference == self.teacher.folder:
                self._reference_losses = self._block_losses(self.teacher.model, self.corpus.validation_sets)
            else:
                from transformers import AutoModelForCausalLM

                model = (
                    AutoModelForCausalLM.from_pretrained(self.reference, dtype=torch.float32)
                    .to(self.accelerator.device)
                    .eval()
                )
                self._reference_losses = self._block_losses(model, self.corpus.validation_sets)
                del model
        return self._reference_losses

    @torch.no_grad()
    def validate(self) -> dict:
        """Mean token loss (over every validation corpus, and per corpus), the perplexity ratio to the reference model
        per corpus when there is one, and head usage (every process computes the same)."""
        from ..eval.experts import ExpertUsage
        from ..eval.usage import HeadUsage

        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        sets = self.corpus.validation_sets or {"validation": self.corpus.validation}
        with HeadUsage(model) as usage, ExpertUsage(model) as experts:
            per_corpus = self._block_losses(model, sets)
        sizes = {name: len(blocks) for name, blocks in sets.items()}
        metrics = {"val_loss": sum(per_corpus[n] * sizes[n] for n in sets) / max(sum(sizes.values()), 1)}
        if len(sets) > 1 or self.reference is not None:
            metrics["val_loss_by_corpus"] = per_corpus
        if self.reference is not None:
            reference = self.reference_losses()
            metrics["recovery"] = {
                name: _ratio(per_corpus[name] - reference[name]) for name in per_corpus if name in reference
            }
        fraction = usage.fraction()
        if fraction.numel():
            metrics["head_usage"] = [[round(v, 4) for v in row] for row in fraction.tolist()]
        if experts.routers:
            metrics["expert_usage"] = {name: [round(v, 4) for v in row] for name, row in experts.fraction().items()}
        return metrics

    def run(self) -> Path | None:
        """Train to ``training.steps`` (or ``stop_after`` steps in this run); save the final model at the end."""
        from tqdm.auto import tqdm

        training = self.recipe.training
        metrics_path = self.output / "metrics.jsonl"
        if self.accelerator.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            if self.step == 0 and metrics_path.exists():
                metrics_path.unlink()
        tokens_per_step = self.plan.sequences_per_step * self.recipe.data.seq_len
        self._print(
            f"training {self.trainable_parameters:,} parameters ({self.recipe.trainable}) "
            f"for {training.steps} steps of "
            f"{tokens_per_step:,} tokens ({self.plan.sequences_per_step} sequences = "
            f"{self.plan.world_size} process(es) x "
            f"{self.plan.accumulation} accumulation x {self.plan.micro_batch_size}) on {self.accelerator.device}"
        )
        if self.step == 0 and training.eval_every:  # the curve's start: before any tuning
            start = {"step": 0, "tokens": 0} | self.validate()
            if self.accelerator.is_main_process:
                with metrics_path.open("a") as log:
                    log.write(json_line(start))
        last = training.steps if self.stop_after is None else min(training.steps, self.step + self.stop_after)
        progress = tqdm(
            total=training.steps,
            initial=self.step,
            desc="finetune",
            unit="step",
            file=sys.stderr,
            disable=not self.accelerator.is_main_process,
        )
        self._progress = progress
        try:  # closed on any exit, so that an error or interrupt line starts a line of its own
            while self.step < last:
                started = time.perf_counter()
                metrics = self.train_step()
                seconds = time.perf_counter() - started
                metrics |= {"tokens": self.step * tokens_per_step, "tokens_per_second": tokens_per_step / seconds}
                if training.eval_every and (self.step % training.eval_every == 0 or self.step == training.steps):
                    metrics |= self.validate()
                if self.accelerator.is_main_process and (
                    self.step % training.log_every == 0 or "val_loss" in metrics or "skipped" in metrics
                ):
                    with metrics_path.open("a") as log:
                        log.write(json_line(metrics))
                progress.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
                progress.update(1)
                self._check_finite(metrics)
                if training.save_every and self.step % training.save_every == 0 and self.step < training.steps:
                    self.save_checkpoint()
        finally:
            progress.close()
            self._progress = None
        if self.step < training.steps:
            self.save_checkpoint()
            self._print(f"stopped after step {self.step} of {training.steps}; continue with --resume")
            return None
        return self.save_final()

    def _nonfinite_weight(self) -> str | None:
        """The first weight that is not finite, or would not be once cast to the source dtype; checked on every
        process (its own shards under FSDP) so that all stop together."""
        model = self.accelerator.unwrap_model(self.model)
        limit = torch.finfo(self.source_dtype).max if self.source_dtype.is_floating_point else None
        found = None
        with torch.no_grad():
            for name, tensor in model.state_dict().items():
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                if not local.is_floating_point() or not local.numel():
                    continue
                if not torch.isfinite(local).all() or (limit is not None and local.abs().max() > limit):
                    found = name
                    break
        flag = torch.tensor([float(found is not None)], device=self.accelerator.device)
        elsewhere = self.accelerator.reduce(flag, reduction="sum").item() > 0
        return found or ("a weight on another process" if elsewhere else None)

    def save_final(self) -> Path | None:
        """The tuned model in the same self-describing format as ``convert`` output (LoRA merged); never one with
        non-finite weights."""
        self.accelerator.wait_for_everyone()
        bad = self._nonfinite_weight()
        if bad is not None:
            kept = latest_checkpoint(self.output)
            raise UpcycleError(
                f"the tuned weights are not finite in {self.source_dtype} ({bad}), "
                f"so {self.output / FINAL} was not written; "
                "lower training.lr and start again with --overwrite"
                + (f" or --resume from {kept.name}" if kept else "")
            )
        final = self.output / FINAL
        # under FSDP each process holds a shard: every process takes part in gathering the full weights (to rank 0)
        gathered = self.accelerator.get_state_dict(self.model) if self._sharded else None
        if self.accelerator.is_main_process:
            from ..checkpoint.writer import atomic_output, copy_support_files

            model = self.accelerator.unwrap_model(self.model)
            if hasattr(model, "merge_and_unload"):
                model = model.merge_and_unload()
            weights = None
            if gathered is None:
                model = model.to(self.source_dtype)
            else:
                weights = {name: tensor.to(self.source_dtype) for name, tensor in gathered.items()}
                model.config.dtype = self.source_dtype
            with atomic_output(final, overwrite=True) as temp:
                model.save_pretrained(temp, state_dict=weights)
                copy_support_files(self.model_path, temp)
                copy_runtime(self.model_path, temp, trust_remote_code=self.recipe.trust_remote_code)
                report = self.model_path / "upcycle_report.json"
                if report.exists():
                    shutil.copyfile(report, temp / "upcycle_report.json")
        self.accelerator.wait_for_everyone()
        return final


def _ratio(log_ratio: float) -> float:
    """exp(log_ratio), inf where it overflows (a diverged model) rather than an OverflowError."""
    return math.exp(log_ratio) if log_ratio < 709 else math.inf


def _config_dtype(folder: Path) -> torch.dtype:
    config = json.loads((Path(folder) / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return getattr(torch, name, torch.float32)


def copy_runtime(source: Path, target: Path, trust_remote_code: bool = False) -> None:
    """Give ``target`` (final/, its config.json already saved) upcycle's runtime when its auto_map names it, and no
    other code.

    The runtime files are the installed package's (upcycle/modeling, what convert writes), never the source folder's
    .py files. A source whose config.json or tokenizer_config.json has an auto_map naming code of its own is refused in
    one line unless ``trust_remote_code``; even then that code is not copied, and the auto_map that would point at it
    is dropped from target's config.json and tokenizer_config.json (the tuned model loads with its family's standard
    classes)."""
    from ..checkpoint.reader import RUNTIME_DIR, foreign_code, is_upcycle_runtime, refuse_remote_code

    source, target = Path(source), Path(target)
    refuse_remote_code(
        source,
        trust_remote_code=trust_remote_code,
        fix=f"{target.parent / FINAL} was not written; remove that auto_map from the source "
        "(the model loads with its family's standard classes) and run the finetune again",
    )
    for name in ("config.json", "tokenizer_config.json"):
        file = target / name
        config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        auto_map = config.get("auto_map") if isinstance(config, dict) else None
        if name == "config.json" and auto_map and is_upcycle_runtime(auto_map):
            for runtime in sorted(RUNTIME_DIR.glob("*.py")):
                if runtime.name != "__init__.py":
                    shutil.copyfile(runtime, target / runtime.name)
        elif auto_map and foreign_code(config):
            file.write_text(
                json.dumps(
                    {key: value for key, value in config.items() if key != "auto_map"}, indent=2, sort_keys=True
                )
                + "\n"
            )
