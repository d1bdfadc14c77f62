"""Third-party noise is silenced by message: exactly those messages, not their loggers or categories."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import logging, warnings
from xray_train.quiet import silence_what_users_cannot_act_on
silence_what_users_cannot_act_on()
silence_what_users_cannot_act_on()  # idempotent
log = logging.getLogger("bitsandbytes.backends.cpu.ops")
log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure", "no kernels")
log.warning("another bitsandbytes warning")
warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
warnings.warn("another future change", FutureWarning)
"""


def test_only_the_named_messages_are_silenced():
    err = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stderr
    assert "kernels-community" not in err and "is_gradient_checkpointing" not in err
    assert err.count("another bitsandbytes warning") == 1 and "another future change" in err
