"""Where a run executes: the hardware plan (`plan`) and the IPU path (`ipu`). `xraycls.hardware.plan`
imports nothing heavy; `ipu` imports PopTorch only when asked."""

from xraycls.hardware.plan import HardwarePlan, PlanError, plan_from_config, resolve_plan, trainer_arguments

__all__ = ["HardwarePlan", "PlanError", "plan_from_config", "resolve_plan", "trainer_arguments"]
