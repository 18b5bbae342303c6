"""The `hcp.eval` and `hcp.time` resolvers (and v1's `hcp.from_memory`, refused), and the run clock that `hcp.time`
reads."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hcpdiff.config.arith import Number, eval_arithmetic
from hcpdiff.errors import ConfigError

RUN_TIME_ENV = "HCP_RUN_TIME"
RUN_TIME_FORMAT = "%Y-%m-%d-%H-%M-%S"
# load_config puts the run's stamp under this root key while resolving, so `hcp.time` reads the
# clock of that load rather than a global; the key is removed again before the config is returned.
RUN_TIME_KEY = "_hcp_run_time_"


@dataclass(frozen=True)
class RunClock:
    """The run's start time as a `%Y-%m-%d-%H-%M-%S` stamp, taken once so every key agrees."""

    stamp: str

    @classmethod
    def now(cls) -> RunClock:
        """A clock reading the current local time."""
        return cls(datetime.now().strftime(RUN_TIME_FORMAT))

    @classmethod
    def for_run(cls) -> RunClock:
        """`$HCP_RUN_TIME` verbatim when set (launchers set it so all ranks agree), else this process's clock."""
        stamp = os.environ.get(RUN_TIME_ENV, "")
        return cls(stamp) if stamp else process_clock()

    def format(self, fmt: str | None = None) -> str:
        """The stamp itself, or the same moment in another strftime format."""
        if not fmt or fmt == RUN_TIME_FORMAT:
            return self.stamp
        try:
            moment = datetime.strptime(self.stamp, RUN_TIME_FORMAT)
        except ValueError as err:
            raise ConfigError(
                f"hcp.time: run time '{self.stamp}' (from ${RUN_TIME_ENV}) is not in the form "
                f"'{RUN_TIME_FORMAT}', so it cannot be shown as '{fmt}'.") from err
        return moment.strftime(fmt)


@functools.cache
def process_clock() -> RunClock:
    """This process's clock, read on first use and cached, so two loads in one process name the same run."""
    return RunClock.now()


def hcp_eval(expression: Any) -> Number:
    """`${hcp.eval:"512*768"}` -> 393216: arithmetic only (see hcpdiff.config.arith)."""
    if isinstance(expression, (int, float)) and not isinstance(expression, bool):
        return expression
    if not isinstance(expression, str):
        raise ConfigError(f"hcp.eval: expected an arithmetic expression in quotes, got {expression!r}.")
    return eval_arithmetic(expression)


def hcp_time(fmt: str | None = None, *, _root_: Any) -> str:
    """`${hcp.time:}` -> the run's timestamp; `${hcp.time:"%Y%m%d"}` formats the same moment differently."""
    stamp = _root_.get(RUN_TIME_KEY) if isinstance(_root_, DictConfig) else None
    clock = RunClock(stamp) if isinstance(stamp, str) and stamp else RunClock.for_run()
    return clock.format(fmt)


def hcp_from_memory(name: Any = None) -> Any:
    """HCP-Diffusion v1's `${hcp.from_memory:name}` (an object of its inference workflows, `hcpdiff.workflow.*`):
    refused in one line that names what renders today."""
    raise ConfigError(f"hcp.from_memory:{name}: HCP-Diffusion v1's workflow memory has no counterpart here; render "
                      "with python -m hcpdiff.visualizer and a cfgs/infer config (pretrained_model, lora_path, "
                      "init_image / mask_image / highres_fix, condition_image, controlnet)")


def register_resolvers() -> None:
    """Register `hcp.eval`, `hcp.time` (and v1's `hcp.from_memory`, to refuse it) with OmegaConf once."""
    for name, resolver in (("hcp.eval", hcp_eval), ("hcp.time", hcp_time), ("hcp.from_memory", hcp_from_memory)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
