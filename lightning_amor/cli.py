"""The ``lightning-amor`` command: LightningCLI over AmortizedModule and ContextDataModule."""

from __future__ import annotations

import sys
from typing import Optional

from pytorch_lightning.cli import LightningCLI

from datamodules.context import ContextDataModule
from lightning_amor.module import AmortizedModule


class AmortCLI(LightningCLI):
    """LightningCLI with subclass mode for models and data; prints the held-out metrics after ``fit``."""

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        print("\nheld-out validation metrics (fixed, seeded contexts never used in training):")
        for name, value in sorted(metrics.items()):
            print(f"  {name:<20} {value:.6g}")
        if trainer.logger is not None and trainer.logger.log_dir is not None:
            log_dir, root = trainer.logger.log_dir, trainer.logger.save_dir
            print(f"TensorBoard logs: {log_dir}  (watch with: tensorboard --logdir {root})")
        if trainer.checkpoint_callback is not None and getattr(trainer.checkpoint_callback, "dirpath", None):
            print(f"checkpoints: {trainer.checkpoint_callback.dirpath}")


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``lightning-amor`` console script (fit / validate / test / predict)."""
    AmortCLI(
        AmortizedModule,
        ContextDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args if args is not None else sys.argv[1:],
        auto_configure_optimizers=False,
        # A rerun into the same folder (e.g. without a versioned logger) must not abort: the recipe is also
        # stored in every checkpoint.
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
