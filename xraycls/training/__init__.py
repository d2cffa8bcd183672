"""One training run: its phases (`run`: build, fit, evaluate, export), the config readers they share
(`config`), its callbacks (`callbacks`, `timing`'s RunTimer), its loggers (`wandb_logger`) and the pieces of
summary.json (`summary`, `preparation`, `outputs`, `artifacts`)."""

from xraycls.training.callbacks import instantiate_callbacks
from xraycls.training.config import find_resume_checkpoint, hardware_plan
from xraycls.training.run import run_training
from xraycls.training.summary import SUMMARY_NAME

__all__ = ["run_training", "hardware_plan", "instantiate_callbacks", "find_resume_checkpoint", "SUMMARY_NAME"]
