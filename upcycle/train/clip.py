"""CLIP recipes on accelerate: contrastive tuning (``type: clip``) and Multistage Contrastive Learning
(``type: clip-mcl``).

MCL (CLIP-MoE) makes the experts of a CLIP-MoE: stage 0 is the base. Before each stage the
data is encoded with the latest model, each modality's L2-normalised features are clustered
with k-means (``mcl.clusters`` = k), the joint label is ``k * c_text + c_image`` and the
accumulated pseudo-label ``l_s = k^2 l_{s-1} + c_s``. Stage s starts again from the base,
trains only the FFNs (fc1/fc2 of both towers) and the logit scale, for ``training.epochs``
with every batch drawn from one pseudo-label cluster (so in-batch negatives share all earlier
labels), and is saved as ``OUTPUT/stage-s``: ``upcycle convert BASE OUT --method clip-moe
--expert OUTPUT/stage-1 ...`` assembles them. The loss is the symmetric InfoNCE with label
smoothing; with several processes every global batch is still cluster-pure (each process
takes its share of it). ``type: clip`` trains ``trainable`` (all, ffn or routers: the
CLIP-MoE router training, with the load-balance terms of both towers) on shuffled batches
and writes ``OUTPUT/final``. Both log to ``OUTPUT/metrics.jsonl`` and report zero-shot
retrieval recall@1 on ``data.validation`` in ``OUTPUT/eval.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UpcycleError
from ..files import json_text
from .loop import MAX_SKIPPED_STEPS, json_line
from .recipe import ClipRecipe


def contrastive_loss(logits_per_image: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of B matching pairs; logits [B, B] (already times the logit scale)."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (
        F.cross_entropy(logits_per_image, target, label_smoothing=label_smoothing)
        + F.cross_entropy(logits_per_image.T, target, label_smoothing=label_smoothing)
    ) / 2


def gather_with_grad(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All processes' rows (process r holds ``sizes[r]``), concatenated in rank order, with gradients flowing
    back to each process's own rows.

    Every process then computes the loss of the whole batch; after the gradient all-reduce (a mean)
    each parameter's gradient equals the one-process gradient of that batch. Shares may differ in
    size: they are padded for the all-gather and the padding is dropped.
    """
    if len(sizes) == 1:
        return tensor
    import torch.distributed.nn.functional as distributed

    longest = max(sizes)
    padded = (
        torch.cat([tensor, tensor.new_zeros(longest - tensor.shape[0], *tensor.shape[1:])])
        if tensor.shape[0] < longest
        else tensor
    )
    parts = distributed.all_gather(padded.contiguous())
    return torch.cat([part[:size] for part, size in zip(parts, sizes)], dim=0)


def tower_balance_loss(model) -> torch.Tensor | None:
    """Sum over towers of the mean load-balance term of the tower's expert routers (LB_image + LB_text)."""
    from .loop import router_term

    terms = [router_term(tower, "aux_loss") for tower in (model.vision_model, model.text_model)]
    terms = [term for term in terms if term is not None]
    return torch.stack(terms).sum() if terms else None


def shuffled_batches(count: int, batch_size: int, seed: int) -> list[list[int]]:
    """Seeded random batches of ``batch_size`` indices (a last batch of at least 2 is kept)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i : i + batch_size] for i in range(0, count, batch_size)]
    return [batch for batch in batches if len(batch) >= 2]


def cluster_batches(labels: list[int], batch_size: int, seed: int) -> tuple[list[list[int]], int]:
    """Cluster-pure batches: each holds indices of one label only; batch order shuffled (seeded).

    Returns the batches and how many samples could not be used (clusters or remainders of one sample).
    """
    generator = torch.Generator().manual_seed(seed)
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        groups.setdefault(int(label), []).append(index)
    batches, unused = [], 0
    for label in sorted(groups):
        members = [groups[label][i] for i in torch.randperm(len(groups[label]), generator=generator).tolist()]
        for start in range(0, len(members), batch_size):
            batch = members[start : start + batch_size]
            if len(batch) >= 2:
                batches.append(batch)
            else:
                unused += len(batch)
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order], unused


def joint_labels(
    image_clusters: torch.Tensor, text_clusters: torch.Tensor, clusters: int, previous: torch.Tensor | None
) -> torch.Tensor:
    """``c = k c_text + c_image``; accumulated ``l = k^2 l_prev + c`` (int64)."""
    joint = clusters * text_clusters.long() + image_clusters.long()
    return joint if previous is None else clusters * clusters * previous.long() + joint


def kmeans_labels(features: torch.Tensor, clusters: int, seed: int) -> torch.Tensor:
    """MiniBatchKMeans cluster of each (L2-normalised) feature row."""
    from sklearn.cluster import MiniBatchKMeans

    if features.shape[0] < clusters:
        raise UpcycleError(
            f"MCL needs at least mcl.clusters={clusters} pairs to cluster, got {features.shape[0]}; "
            "add data or lower mcl.clusters"
        )
    kmeans = MiniBatchKMeans(n_clusters=clusters, random_state=seed, n_init=3, batch_size=1024)
    return torch.from_numpy(kmeans.fit_predict(features.double().numpy())).long()


@torch.no_grad()
def encode(model, dataset, collator, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and text embeddings [N, P] of every pair."""
    model.eval()
    images, texts = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        out = model(**batch)
        images.append(F.normalize(out.image_embeds.float(), dim=-1).cpu())
        texts.append(F.normalize(out.text_embeds.float(), dim=-1).cpu())
    return torch.cat(images), torch.cat(texts)


def retrieval_recall(images: torch.Tensor, texts: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Zero-shot recall@1 over the pairs: image->text and text->image. A retrieval counts when its
    caption equals the query's (several images can share one caption)."""
    similarity = images @ texts.T  # [N, N]
    image_to_text = similarity.argmax(dim=1).tolist()
    text_to_image = similarity.argmax(dim=0).tolist()
    n = len(captions)
    return {
        "image_to_text_r1": sum(captions[j] == captions[i] for i, j in enumerate(image_to_text)) / n,
        "text_to_image_r1": sum(captions[j] == captions[i] for i, j in enumerate(text_to_image)) / n,
    }


def set_trainable(model, trainable: str) -> int:
    """Freeze all but ``trainable`` (all, ffn: fc1/fc2 of both towers and the logit scale, routers); returns the
    count."""
    for name, param in model.named_parameters():
        if trainable == "all":
            param.requires_grad = True
        elif trainable == "ffn":
            param.requires_grad = ".mlp." in name and ".router." not in name or name == "logit_scale"
        else:
            param.requires_grad = ".mlp.router." in name
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not count:
        raise UpcycleError(
            f"trainable: {trainable} selects no parameter of this model "
            "(routers need a CLIP-MoE from `upcycle convert --method clip-moe`)"
        )
    return count


class ClipRunner:
    """Shared machinery of both recipe types: data, accelerator, one training run, evaluation, saving."""

    def __init__(self, recipe: ClipRecipe, overwrite: bool):
        from accelerate import Accelerator
        from transformers import AutoProcessor

        from ..checkpoint.source import resolve_model
        from ..data.image_text import ImageTextCollator, load_pairs
        from .finetune import claim_output, refuse_folder_code
        from .loop import use_cpu

        self.recipe, self.output = recipe, Path(recipe.output)
        self.accelerator = Accelerator(cpu=use_cpu())
        self.base = resolve_model(recipe.model)
        refuse_folder_code(recipe, "model", self.base)
        # the same rule as causal-LM recipes: no input inside the output; an existing output needs --overwrite
        claim_output(recipe, self.accelerator, resume=False, overwrite=overwrite, inputs={"model": self.base})
        try:
            self.processor = AutoProcessor.from_pretrained(self.base)
        except (OSError, ValueError) as error:
            raise UpcycleError(
                f"{self.base} has no usable CLIP processor ({str(error).splitlines()[0]}); "
                "save the processor with the model"
            ) from None
        self.collator = ImageTextCollator(self.processor, recipe.data.max_length)
        self.train = load_pairs(recipe.data.train)
        self.validation = load_pairs(recipe.data.validation) if recipe.data.validation else None
        self.output.mkdir(parents=True, exist_ok=True)

    def load(self, path: Path):
        from transformers import AutoModel

        import upcycle  # noqa: F401  (registers upcycled classes)

        model = AutoModel.from_pretrained(path, dtype=torch.float32)
        if not hasattr(model, "get_image_features") or not hasattr(model, "logit_scale"):
            raise UpcycleError(
                f"{path} is a {type(model).__name__}, not a CLIP model; CLIP recipes need a CLIPModel checkpoint"
            )
        return model

    def log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.output / "metrics.jsonl", "a") as handle:
                handle.write(json_line(record))

    def evaluate(self, model) -> dict | None:
        if self.validation is None:
            return None
        images, texts = encode(
            self.accelerator.unwrap_model(model), self.validation, self.collator, 64, self.accelerator.device
        )
        return retrieval_recall(images, texts, list(self.validation["text"]))

    def fit(self, model, batches: list[list[int]], label: str) -> dict:
        """Train ``model`` (its trainable parameters) over ``batches`` of global indices; returns the last metrics."""
        from transformers import get_cosine_schedule_with_warmup

        training, losses = self.recipe.training, self.recipe.losses
        world = self.accelerator.num_processes
        batches = [batch for batch in batches if len(batch) >= max(2, world)]  # every process needs a pair
        steps = max(1, math.ceil(training.epochs * len(batches)))
        if not batches:
            raise UpcycleError(
                f"{label}: no batch of at least {max(2, world)} pairs; "
                "add data or lower training.batch_size / processes"
            )
        plan = [batches[i % len(batches)] for i in range(steps)]
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=training.lr, betas=training.adam_betas, weight_decay=training.weight_decay
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(training.warmup_steps, steps // 2), steps)
        model, optimizer = self.accelerator.prepare(model, optimizer)
        model.train()
        started, last, skipped = time.time(), {}, []
        for step, batch in enumerate(plan, 1):
            loss, balance, scale = self._batch_loss(model, batch)
            total = loss + (losses.load_balance * balance if balance is not None else 0.0)
            self.accelerator.backward(total)
            grad_norm = float(self.accelerator.clip_grad_norm_(params, training.grad_clip))
            # the loss (over the gathered batch) and the gradient norm are the same on every process: all skip together
            if math.isfinite(total.item()) and math.isfinite(grad_norm):
                optimizer.step()
                skipped = []
            else:
                skipped.append(step)
                self._skip(label, step, skipped)
            # a skipped first step: torch warns that the scheduler steps before the optimizer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last = {
                "stage": label,
                "step": step,
                "pairs": len(batch),
                "loss": loss.item(),
                "aux_loss": balance.item() if balance is not None else 0.0,
                "lr": scheduler.get_last_lr()[0],
                "logit_scale": scale.item(),
                "seconds": round(time.time() - started, 1),
            }
            if step % training.log_every == 0 or step == steps:
                self.log(last)
                if self.accelerator.is_main_process:
                    print(
                        f"\r{label}: step {step}/{steps} loss {last['loss']:.4f}", end="", file=sys.stderr, flush=True
                    )
        if self.accelerator.is_main_process:
            print(file=sys.stderr)
        return last

    def _batch_loss(self, model, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(contrastive loss over the whole global ``batch``, the towers' balance term or None, the logit scale):
        every process encodes its share of the same batch (one cluster) and the embeddings are gathered."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        local = batch[rank::world]
        sizes = [len(batch[r::world]) for r in range(world)]
        inputs = {
            key: value.to(self.accelerator.device)
            for key, value in self.collator([self.train[i] for i in local]).items()
        }
        out = model(**inputs)
        all_image = gather_with_grad(out.image_embeds, sizes)  # [B, P]
        all_text = gather_with_grad(out.text_embeds, sizes)  # [B, P]
        scale = self.accelerator.unwrap_model(model).logit_scale.exp()
        loss = contrastive_loss(scale * all_image @ all_text.T, self.recipe.losses.label_smoothing)
        return loss, tower_balance_loss(self.accelerator.unwrap_model(model)), scale

    def _skip(self, label: str, step: int, skipped: list[int]) -> None:
        """Warn about a skipped step (a loss or gradient that is not finite); stop after MAX_SKIPPED_STEPS in a row."""
        if self.accelerator.is_main_process:
            print(
                f"\nwarning: {label} step {step}: the loss or gradient is not finite; the step was skipped",
                file=sys.stderr,
            )
        if len(skipped) >= MAX_SKIPPED_STEPS:
            raise UpcycleError(
                f"{label}: training stopped at step {step}: the loss or gradient was not finite at steps "
                f"{', '.join(map(str, skipped))} (each skipped); lower training.lr or check the data, "
                "then start again with --overwrite"
            )

    def record(self, folder: Path, finetune: dict, evaluation: list[dict], name: str | None = None) -> None:
        """Write the saved ``folder``'s report and model card (main process)."""
        if self.accelerator.is_main_process:
            from .finetune import record_tuning

            finetune = {
                "type": self.recipe.type,
                "processes": self.accelerator.num_processes,
                **finetune,
                "recipe": self.recipe.model_dump(mode="json"),
            }
            record_tuning(
                folder,
                self.base,
                self.recipe.model,
                name=name or self.output.name,
                finetune=finetune,
                evaluation=evaluation,
            )

    def save(self, model, folder: Path) -> None:
        """save_pretrained plus the processor (and the runtime files of upcycled models), atomically; never
        non-finite weights."""
        self.accelerator.wait_for_everyone()
        bad = next(
            (
                name
                for name, tensor in self.accelerator.unwrap_model(model).state_dict().items()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()
            ),
            None,
        )
        if bad is not None:  # every process holds the same replica, so all raise together
            raise UpcycleError(
                f"the tuned weights are not finite ({bad}), so {folder} was not written; lower training.lr "
                "and start again with --overwrite"
            )
        if self.accelerator.is_main_process:
            from ..checkpoint.writer import atomic_output, copy_support_files
            from .loop import copy_runtime

            with atomic_output(folder, overwrite=True) as temp:
                self.accelerator.unwrap_model(model).save_pretrained(temp)
                copy_support_files(self.base, temp)
                copy_runtime(self.base, temp, trust_remote_code=self.recipe.trust_remote_code)
        self.accelerator.wait_for_everyone()


def run_clip_recipe(recipe: ClipRecipe, overwrite: bool = False) -> Path:
    """Run a ``type: clip`` or ``type: clip-mcl`` recipe; returns OUTPUT/final or the last stage folder."""
    from .finetune import output_held
    from .loop import process_state

    with output_held(recipe, process_state()):
        return _run_clip(recipe, overwrite)


def _run_clip(recipe: ClipRecipe, overwrite: bool) -> Path:
    """The run of a CLIP recipe, in its held output."""
    runner = ClipRunner(recipe, overwrite)
    training = recipe.training
    report: dict = {"type": recipe.type, "pairs": len(runner.train), "processes": runner.accelerator.num_processes}
    if recipe.type == "clip":
        model = runner.load(runner.base)
        report["trainable_parameters"] = set_trainable(model, recipe.trainable)
        report["before"] = runner.evaluate(model)
        report["last"] = runner.fit(
            model, shuffled_batches(len(runner.train), training.batch_size, training.seed), "clip"
        )
        report["after"] = runner.evaluate(model)
        final = runner.output / "final"
        runner.save(model, final)
        runner.record(
            final,
            {"pairs": report["pairs"], "trainable_parameters": report["trainable_parameters"]},
            [
                row | {"name": name}
                for name, row in (("before tuning", report["before"]), ("after tuning", report["after"]))
                if row
            ],
        )
    else:
        final = run_mcl(runner, report)
    if runner.accelerator.is_main_process:
        (runner.output / "eval.json").write_text(json_text(report))
    return final


def run_mcl(runner: ClipRunner, report: dict) -> Path:
    """Stages 1..S of Multistage Contrastive Learning, each from the base; returns the last stage's folder."""
    recipe = runner.recipe
    mcl, training = recipe.mcl, recipe.training
    model = runner.load(runner.base)
    labels: torch.Tensor | None = None
    report["stages"] = [{"stage": 0, "model": str(runner.base), "validation": runner.evaluate(model)}]
    folder = runner.base
    for stage in range(1, mcl.stages + 1):
        images, texts = encode(
            runner.accelerator.unwrap_model(model), runner.train, runner.collator, 64, runner.accelerator.device
        )
        seed = training.seed + 1000 * stage
        labels = joint_labels(
            kmeans_labels(images, mcl.clusters, seed),
            kmeans_labels(texts, mcl.clusters, seed + 1),
            mcl.clusters,
            labels,
        )
        batches, unused = cluster_batches(labels.tolist(), training.batch_size, seed)
        model = runner.load(runner.base)
        if training.logit_scale_init is not None:
            with torch.no_grad():
                model.logit_scale.fill_(training.logit_scale_init)
        trainable = set_trainable(model, "ffn")
        last = runner.fit(model, batches, f"stage {stage}")
        folder = runner.output / f"stage-{stage}"
        runner.save(model, folder)
        if runner.accelerator.is_main_process:
            (folder / "mcl_labels.json").write_text(
                json.dumps({"stage": stage, "clusters": mcl.clusters, "labels": labels.tolist()}) + "\n"
            )
        model = runner.accelerator.unwrap_model(model)
        report["stages"].append(
            {
                "stage": stage,
                "model": str(folder),
                "pseudo_labels": int(labels.unique().numel()),
                "batches": len(batches),
                "unused_pairs": unused,
                "trainable_parameters": trainable,
                "last": last,
                "validation": runner.evaluate(model),
            }
        )
        validation = report["stages"][-1]["validation"]
        runner.record(
            folder,
            {"stage": stage, "stages": mcl.stages, "pairs": len(runner.train), "trainable_parameters": trainable},
            [validation | {"name": f"stage {stage}"}] if validation else [],
            name=f"{runner.output.name}-stage-{stage}",
        )
    return folder
