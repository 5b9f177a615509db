"""What a run leaves beside its adapter: `loraswap.json` provenance and the loss-curve PNG.

The provenance uses `adapters.provenance.Provenance` (the schema the server validates
uploads against): base fingerprint, chat-template sha256, tokenizer vocabulary size, data
sha256, hyperparameters, and the final losses and token counts as metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapters.provenance import Provenance

if TYPE_CHECKING:  # pragma: no cover - typing only, avoids an import cycle with sft
    from trainer.sft import SFTRecipe, TrainResult


def build_provenance(recipe: "SFTRecipe", result: "TrainResult") -> dict:
    """The `loraswap.json` content of a finished run, as a JSON-ready dict."""
    train, evaluation = recipe.train_data, recipe.eval_data
    metrics = {
        "train_loss": result.train_loss,
        "eval_loss": result.eval_loss,
        "epoch_train_losses": result.epoch_train_losses,
        "epoch_eval_losses": result.eval_losses,
        "tokens_seen": result.tokens_seen,
        "trained_tokens_seen": result.targets_seen,
        "train_seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "train_conversations": len(train.examples),
        "dropped_conversations": train.dropped,
        "truncated_conversations": train.truncated,
        "trained_token_share": round(train.trained_share, 6),
    }
    provenance = Provenance(
        base_fingerprint=recipe.info.fingerprint or None,
        chat_template_sha256=recipe.template.sha256,
        tokenizer_vocab_size=len(recipe.tokenizer),
        training_data_sha256=train.sha256,
        # world_size: how many data-parallel processes shared each (global) micro-batch.
        hyperparameters={**recipe.config.hyperparameters(), "world_size": recipe.dist.world_size},
        metrics={k: v for k, v in metrics.items() if v is not None},
        producer="loraswap train",
        eval_data_sha256=evaluation.sha256 if evaluation is not None else None,
    )
    return provenance.to_json_dict()


def plot_loss_curve(result: "TrainResult", path: Path, steps_per_epoch: int) -> Path:
    """Train loss per optimizer step, and the eval loss at the end of each epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in tests and containers
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    steps = range(1, len(result.step_losses) + 1)
    axes.plot(steps, result.step_losses, label="train (per step)", linewidth=1)
    if result.eval_losses:
        epochs_end = [steps_per_epoch * (i + 1) for i in range(len(result.eval_losses))]
        axes.plot(epochs_end, result.eval_losses, "o-", label="eval (per epoch)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (assistant tokens)")
    axes.set_title("loraswap train")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path
