"""The CAVGA training loop (paper eq. 4 and 6): a generator side (encoder, latent heads, decoder, classifier) and a
discriminator, each with its own optimizer; the generator is trained to fool the discriminator."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from cavga.config import TrainConfig, to_dict
from cavga.data.types import ANOMALOUS, NORMAL, Batch, collate_samples
from cavga.engine import distributed, runlog
from cavga.engine.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from cavga.errors import CavgaError, ConfigError
from cavga.model import losses
from cavga.model.gradcam import class_attention, output_attention, signed_class_maps
from cavga.model.networks import CavgaNet

log = logging.getLogger(__name__)


class TrainingError(CavgaError):
    """Training cannot go on (a loss became NaN/Inf, the data holds no usable image)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may draw from the legacy global RNG
    torch.manual_seed(seed)


def _check_finite(terms: dict[str, torch.Tensor], step: int) -> None:
    for name, value in terms.items():
        if not torch.isfinite(value).all():
            raise TrainingError(f"loss term {name!r} became {value.item()} at step {step}; training stopped")


def class_weights_for(labels: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights ``n / (2 n_class)`` for the classifier's BCE (CAVGA_w).

    With ~2 % anomalous images an unweighted BCE is minimized by calling everything normal. The weights balance
    whatever the training set holds: by default the labelled images come with augmented copies and synthesized
    anomalies (``anomalous_share``, ``synthetic_share``) that raise their share to under a fifth of an epoch, not
    to a half, so the normal images the VAE and GAN learn from keep most batch slots.
    """
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2).astype(np.float64)
    if (counts == 0).any():
        raise TrainingError(
            f"weakly supervised training needs both normal and anomalous images, got counts {counts.tolist()}"
        )
    return torch.tensor(counts.sum() / (2.0 * counts), dtype=torch.float32)


@contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """Parameters of ``module`` need no gradient inside the block (they still pass gradients to its input).

    The generator's adversarial term backpropagates through D to x_hat only; D's own weight gradients there
    would be computed and then discarded (opt_d zeroes them before its next step), so we skip them.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def training_step(
    model: CavgaNet,
    batch: Batch,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    config: TrainConfig,
    class_weights: torch.Tensor | None = None,
    step: int = 0,
    grad_sync: Callable[[torch.optim.Optimizer], None] | None = None,
) -> dict[str, float]:
    """One update of the discriminator, then one of the generator side. Returns the loss terms.

    ``grad_sync(optimizer)`` runs after each backward, before that optimizer's step (data-parallel training
    averages the gradients there).
    """
    w = config.weights
    x = batch.images
    labels = batch.labels
    normal = labels == NORMAL
    out = model(x, sample=True)
    x_hat = torch.sigmoid(out.x_hat_logits)

    # Discriminator step on real images vs detached reconstructions (SPEC 1.4: x_hat detached for D).
    real = x[normal] if model.config.setting == "w" else x
    fake = x_hat[normal] if model.config.setting == "w" else x_hat
    opt_d.zero_grad(set_to_none=True)
    loss_d = losses.discriminator_loss(model.discriminator(real), model.discriminator(fake.detach()))
    _check_finite({"L_D": loss_d}, step)
    loss_d.backward()
    if grad_sync is not None:
        grad_sync(opt_d)
    opt_d.step()

    # Generator side: eq. 4 (u) or eq. 6 (w).
    terms: dict[str, torch.Tensor] = {}
    if model.config.setting == "u":
        terms["L"] = losses.vae_loss(out.x_hat_logits, x, out.mu, out.logvar)
        with _frozen(model.discriminator):
            terms["L_adv"] = losses.generator_adversarial_loss(model.discriminator(fake))
        # Closed-form Grad-CAM for the default layer/target (no double backward), autograd otherwise.
        attention = output_attention(model, out, tuple(x.shape[-2:]), create_graph=True)
        terms["L_ae"] = losses.attention_expansion_loss(attention)
        total = w.w_r * terms["L"] + w.w_adv * terms["L_adv"] + w.w_ae * terms["L_ae"]
    else:
        # The VAE and the adversarial game model the normal images only; the few labelled anomalous images train
        # the classifier C and, through it, the attention (paper 3.2).
        terms["L"] = losses.vae_loss(out.x_hat_logits[normal], x[normal], out.mu[normal], out.logvar[normal])
        with _frozen(model.discriminator):
            terms["L_adv"] = losses.generator_adversarial_loss(model.discriminator(fake))
        logits = model.classify(out.z)
        terms["L_bce"] = losses.balanced_classifier_loss(logits, labels, class_weights)
        if config.cga_maps == "signed":
            a_normal = signed_class_maps(model, out, NORMAL)
            a_anomalous = signed_class_maps(model, out, ANOMALOUS)
        else:
            a_normal = class_attention(model, out, NORMAL, create_graph=True)
            a_anomalous = class_attention(model, out, ANOMALOUS, create_graph=True)
        predictions = logits.argmax(dim=1)
        terms["L_cga"] = losses.complementary_guided_attention_loss(a_normal, a_anomalous, predictions, labels)
        total = w.w_r * terms["L"] + w.w_adv * terms["L_adv"] + w.w_c * terms["L_bce"] + w.w_cga * terms["L_cga"]
    terms["total"] = total
    _check_finite(terms, step)
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    if grad_sync is not None:
        grad_sync(opt_g)
    opt_g.step()
    result = {k: float(v.detach()) for k, v in terms.items()}
    result["L_D"] = float(loss_d.detach())
    return result


def make_optimizers(model: CavgaNet, config: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    betas = (config.beta1, config.beta2)
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=config.lr, betas=betas)
    opt_d = torch.optim.Adam(model.discriminator_parameters(), lr=config.lr, betas=betas)
    return opt_g, opt_d


# Discriminator collapse: L_D this small for this many consecutive steps means D wins outright and the
# generator's adversarial gradient has vanished (logged as a warning; training goes on).
COLLAPSE_D_LOSS = 1e-3
COLLAPSE_STEPS = 20
# TrainConfig fields a resumed run may change; any other difference makes the checkpoint's data order or
# optimizer state meaningless for this run.
_RESUMABLE_CHANGES = {"epochs", "device", "num_workers", "checkpoint_every"}


def train(
    model: CavgaNet,
    dataset: Dataset,
    config: TrainConfig,
    progress: bool = True,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_steps: int = 0,
    tensorboard: bool = False,
    run_info: dict[str, Any] | None = None,
    ctx: distributed.DistContext | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place on ``dataset`` (Samples; for setting "w" with some ANOMALOUS labels).

    Returns the per-epoch mean of every loss term. Deterministic on CPU for a given ``config.seed``.

    ``run_dir``: where ``checkpoint.safetensors`` is kept, written every ``checkpoint_steps`` steps, every
    ``config.checkpoint_every`` epochs, at the end, and before stopping on a NaN/Inf loss; also ``run.json``
    (``run_info`` and the resolved settings) and ``train.log`` (epoch loss means, checkpoints, why training
    stopped), appended to by every run there. ``resume``: continue exactly from that checkpoint (same weights,
    optimizer moments, RNG states and position in the data order). ``tensorboard``: also write every loss term
    per step and per epoch, and image grids of a fixed batch each epoch, to ``run_dir/tensorboard`` (needs the
    tensorboard package). ``ctx``: the process group already joined (default: join it here). Under ``torchrun``
    each rank trains on its shard of every global batch of ``batch_size * world_size`` images (see
    :mod:`cavga.engine.distributed`); rank 0 alone writes the run's files.
    """
    config.validate()
    if len(dataset) == 0:
        raise TrainingError("the training set is empty")
    if tensorboard:
        if run_dir is None:
            raise ConfigError("tensorboard logging needs a run directory (run_dir) to write to")
        runlog.require_tensorboard()  # on every rank, before any collective a failing rank 0 would leave hanging
    ctx = ctx or distributed.setup(config.device)
    files = _RunFiles(run_dir, resume, checkpoint_steps, tensorboard, run_info)
    if run_dir is None or not ctx.is_main:
        return _train(
            model, dataset, config, ctx, progress, on_epoch_end, dataclasses.replace(files, tensorboard=False)
        )
    with runlog.log_to_file(Path(run_dir) / runlog.LOG_FILE):
        try:
            return _train(model, dataset, config, ctx, progress, on_epoch_end, files)
        except BaseException as exc:
            # The caller reports the error itself; the log file should say how the run ended too.
            log.error("training stopped: %s", str(exc) or type(exc).__name__, extra={runlog.FILE_ONLY: True})
            raise


@dataclass(frozen=True)
class _RunFiles:
    """What train() keeps in its run directory, and how."""

    run_dir: str | os.PathLike | None
    resume: bool
    checkpoint_steps: int
    tensorboard: bool
    run_info: dict[str, Any] | None


def _train(
    model: CavgaNet,
    dataset: Dataset,
    config: TrainConfig,
    ctx: distributed.DistContext,
    progress: bool,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None,
    files: _RunFiles,
) -> list[dict[str, float]]:
    run_dir, resume, checkpoint_steps = files.run_dir, files.resume, files.checkpoint_steps
    device = resolve_device(config.device)
    seed_everything(config.seed)
    model.to(device).train()
    distributed.broadcast_model(model)
    opt_g, opt_d = make_optimizers(model, config)
    optimizers = {"g": opt_g, "d": opt_d}
    class_weights = None
    if model.config.setting == "w":
        class_weights = class_weights_for(dataset.labels).to(device)  # type: ignore[attr-defined]
    # The data order of epoch e is torch.randperm(n) drawn from a generator seeded with seed + e (what
    # DistributedSampler does), so a resumed run can rebuild it and skip the batches already done.
    sampler = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    # drop_last keeps BatchNorm away from batches of one image (a lone last image would make BN statistics undefined).
    drop_last = len(sampler) > config.batch_size
    batches_per_epoch = len(BatchSampler(range(len(sampler)), config.batch_size, drop_last))

    checkpoint = Path(run_dir) / CHECKPOINT_FILE if run_dir is not None else None
    state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": [], "sums": {}, "n": 0, "streak": 0}
    if resume:
        if checkpoint is None or not checkpoint.is_file():
            raise TrainingError(f"nothing to resume: no {CHECKPOINT_FILE} in {run_dir}")
        saved = load_checkpoint(checkpoint, model, optimizers)
        _check_resumable(saved, config, ctx.world_size, len(dataset), checkpoint)
        state.update({k: saved[k] for k in state})
        log.info(
            "resuming from %s: epoch %d, batch %d, step %d", checkpoint, state["epoch"], state["batch"], state["step"]
        )

    def save(reason: str) -> None:
        if checkpoint is None:
            return
        if reason != "failure":
            distributed.average_buffers(model)  # a collective: every rank gets here at the same step
        if ctx.is_main:
            progress_info = {
                **state,
                "world_size": ctx.world_size,
                "n_samples": len(dataset),
                "train_config": to_dict(config),
                "reason": reason,
            }
            save_checkpoint(checkpoint, model, optimizers, progress_info)
            log.info(
                "checkpoint (%s): epoch %d, batch %d, step %d -> %s",
                reason,
                state["epoch"],
                state["batch"],
                state["step"],
                checkpoint,
            )

    board = None
    if run_dir is not None and ctx.is_main:
        runlog.write_run_file(
            run_dir,
            model,
            config,
            files.run_info,
            n_samples=len(dataset),
            world_size=ctx.world_size,
            device=str(device),
        )
        log.info(
            "training CAVGA-%s_%s on %d images: %d epochs of %d steps, device %s, %d process(es)%s",
            model.config.variant,
            model.config.setting,
            len(dataset),
            config.epochs,
            batches_per_epoch,
            device,
            ctx.world_size,
            f", from step {state['step']}" if resume else "",
        )
        if files.tensorboard:
            board = runlog.TensorBoardLog(
                Path(run_dir) / runlog.TENSORBOARD_DIR, dataset, purge_step=state["step"] if resume else None
            )

    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=config.epochs * batches_per_epoch,
            initial=state["step"],
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
    try:
        for epoch in range(state["epoch"], config.epochs):
            sampler.set_epoch(epoch)
            batches = list(BatchSampler(sampler, config.batch_size, drop_last))
            skip = state["batch"] if epoch == state["epoch"] else 0
            if epoch != state["epoch"]:
                state.update(epoch=epoch, batch=0, sums={}, n=0)
            loader = DataLoader(
                dataset,
                batch_sampler=batches[skip:],
                collate_fn=collate_samples,
                num_workers=config.num_workers,
                pin_memory=device.type == "cuda",
                # Worker seeds come from this generator, not the global RNG (which must stay as checkpointed).
                generator=torch.Generator().manual_seed(config.seed + epoch),
            )
            for batch_index, batch in enumerate(loader, start=skip):
                batch = batch.to(device)
                if model.config.setting == "w" and _lacks_normal_images(batch, ctx):
                    state["batch"] = batch_index + 1
                    continue  # a batch of anomalous images only has nothing for the VAE/GAN terms
                try:
                    terms = training_step(
                        model, batch, opt_g, opt_d, config, class_weights, state["step"], distributed.average_gradients
                    )
                except TrainingError as exc:
                    raise TrainingError(f"{exc}; {_save_last_good(model, save, checkpoint)}") from exc
                state["sums"] = {k: state["sums"].get(k, 0.0) + v for k, v in terms.items()}
                state["n"] += 1
                state["step"] += 1
                state["batch"] = batch_index + 1
                state["streak"] = _watch_discriminator(terms["L_D"], state["streak"], state["step"])
                if board is not None:
                    board.step(terms, state["step"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items() if k != "total"}, refresh=False)
                if checkpoint_steps and state["step"] % checkpoint_steps == 0:
                    save("steps")
            means = {k: v / max(state["n"], 1) for k, v in state["sums"].items()}
            means["epoch"] = epoch + 1
            state["history"].append(means)
            state.update(epoch=epoch + 1, batch=0, sums={}, n=0)
            if ctx.is_main:
                log.info("epoch %d/%d %s", epoch + 1, config.epochs, _fmt(means))
            if board is not None:
                board.epoch(means, epoch + 1, model)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, means)
            if config.checkpoint_every and (epoch + 1) % config.checkpoint_every == 0 and epoch + 1 < config.epochs:
                save("epoch")
    finally:
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
    distributed.average_buffers(model)
    save("end")
    model.eval()
    return state["history"]


def _lacks_normal_images(batch: Batch, ctx: distributed.DistContext) -> bool:
    lacks = not bool((batch.labels == NORMAL).any())
    if not ctx.enabled:
        return lacks
    # Every rank must skip together, or the others would wait forever in the gradient all_reduce.
    flag = torch.tensor([float(lacks)])
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _save_last_good(model: CavgaNet, save: Callable[[str], None], checkpoint: Path | None) -> str:
    """Save the state before the failing update when it is still finite; say what was done."""
    if checkpoint is None:
        return "no run directory, so no checkpoint was written"
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()):
        return f"the weights are no longer finite; the last good checkpoint is the earlier one in {checkpoint}"
    # The failing step's batch is not counted as done. When the bad term is on the generator side, the
    # discriminator has already taken its step on that batch (it comes first), which this state includes.
    save("failure")
    return f"the last good state is saved in {checkpoint}"


def _watch_discriminator(loss_d: float, streak: int, step: int) -> int:
    streak = streak + 1 if loss_d < COLLAPSE_D_LOSS else 0
    if streak == COLLAPSE_STEPS:
        log.warning(
            "discriminator collapse: L_D < %g for %d consecutive steps (step %d); the generator's adversarial "
            "gradient is vanishing (try a lower lr or w_adv)",
            COLLAPSE_D_LOSS,
            COLLAPSE_STEPS,
            step,
        )
    return streak


def _check_resumable(saved: dict, config: TrainConfig, world_size: int, n_samples: int, path: Path) -> None:
    if saved["world_size"] != world_size:
        raise TrainingError(
            f"{path} was written by a run of {saved['world_size']} process(es); resume it with the same number"
        )
    if saved["n_samples"] != n_samples:
        raise TrainingError(f"{path} was trained on {saved['n_samples']} images, this dataset has {n_samples}")
    now, before = to_dict(config), saved["train_config"]
    # A setting the checkpoint predates is not compared (for setting w the sample count above still is).
    changed = sorted(k for k in now if k not in _RESUMABLE_CHANGES and k in before and now[k] != before[k])
    if changed:
        raise TrainingError(f"{path} was written with other training settings ({', '.join(changed)} differ)")


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "epoch" and math.isfinite(v))
