"""Train a small classifier on the 8x8 digits, with lightning-inspect switched on from the command line.

Runs (each well under a minute on a laptop CPU)::

    python examples/train.py                                   # plain training, no inspection
    python examples/train.py +inspect=activations              # activation stats + histograms
    python examples/train.py +inspect=all                      # 4 monitors, run record, overview page
    python examples/train.py model=transformer '+inspect=[activations,gradients]'
    python examples/train.py +inspect=debug                    # every module, every step, stop at the first NaN
    python examples/train.py +inspect=activations inspect.activations.every_n_steps=10 \\
        'inspect.activations.modules=[features.*]'
    python examples/train.py +inspect=activations trainer.max_steps=5   # a 5-step smoke run

Results go to the Hydra run directory (``outputs/<date>/<time>``: TensorBoard events) and to
``mlruns.db`` in the directory the app was started from (MLflow); the last lines printed say how
to open them. The only line that lightning-inspect needs in a script is the one marked below.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger
from omegaconf import DictConfig

from lightning_inspect import instantiate_callbacks


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Compose, build, fit, then say where the results are."""
    L.seed_everything(cfg.seed, workers=True)
    callbacks = instantiate_callbacks(cfg.get("inspect"))  # lightning-inspect: the one line to add
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    loggers: list[Logger] = [
        lg for lg in hydra.utils.instantiate(cfg.get("logger") or {}).values() if lg is not None
    ]
    inspection = [
        type(cb).__name__ for cb in callbacks
    ]  # before the Trainer adds its own callbacks
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, _partial_=True)(
        logger=loggers, callbacks=callbacks
    )
    trainer.fit(model, datamodule=datamodule)
    print_results(loggers, inspection)


def print_results(loggers: list[Logger], names: list[str]) -> None:
    """Print where the run wrote and the commands that open it.

    ``logger.mlflow=null`` drops a logger, ``~logger`` all of them.

    Example output::

        Inspection: ActivationMonitor
        Results in outputs/2025-01-01/12-00-00
          TensorBoard: tensorboard --logdir outputs/2025-01-01/12-00-00/tensorboard
          MLflow:      mlflow ui --backend-store-uri sqlite:////home/me/project/mlruns.db  (run 3f2a...)
    """
    print()
    print(
        f"Inspection: {', '.join(names) if names else 'off (add +inspect=activations, all, debug, ...)'}"
    )
    print(f"Results in {_relative(Path(HydraConfig.get().runtime.output_dir))}")
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            print(f"  TensorBoard: tensorboard --logdir {_relative(Path(logger.log_dir))}")
        elif isinstance(logger, MLFlowLogger):
            print(
                f"  MLflow:      mlflow ui --backend-store-uri {logger.experiment.tracking_uri}  (run {logger.run_id})"
            )


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


if __name__ == "__main__":
    main()
