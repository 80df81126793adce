"""Run logging: rank-0 ``logging`` setup, JSON-lines metrics, optional wandb."""
from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from source.run.errors import UserError

logger = logging.getLogger(__name__)


class WandbSetupError(UserError, RuntimeError):
    """``--wandb-project`` was given but wandb cannot log (no API key, a refused setting)."""


def setup_logging(is_main: bool) -> None:
    """INFO logs to stderr on rank 0, warnings and errors only on the other ranks."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


class MetricsWriter:
    """Append metrics as JSON lines to ``<run_dir>/metrics.jsonl`` and, if asked, to wandb.

    Only rank 0 writes (``enabled``); other ranks get a writer whose calls do nothing.
    Resuming appends to the same file, and to the same wandb run (id stored in the run dir).
    """

    def __init__(self, run_dir: Path, enabled: bool, config: dict[str, Any], wandb_project: str = "", wandb_mode: str = "online") -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project and wandb_mode != "disabled":
            import wandb  # optional dependency: imported only when asked for

            id_file = Path(run_dir) / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            try:
                self.wandb_run = wandb.init(
                    project=wandb_project, mode=wandb_mode, id=run_id, resume="allow",
                    dir=str(run_dir), config=config, name=Path(run_dir).name,
                )
            except wandb.errors.UsageError as error:
                reason = ("there is no wandb API key on this machine" if "api key" in str(error).lower()
                          else f"wandb refused: {error}")
                raise WandbSetupError(
                    f"--wandb-project {wandb_project} with --wandb-mode {wandb_mode}: {reason}. Run `wandb login` "
                    "(or set WANDB_API_KEY), or pass --wandb-mode offline to log locally and `wandb sync` later."
                ) from None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(row, default=float) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
