"""``--num-gpus N``: start the same command under ``accelerate launch``, one process per GPU.

This only spells out the ``accelerate launch`` command a user could type and then becomes it
(``os.execvp``): accelerate starts, watches and stops the ranks. Everything after the subcommand
passes through unchanged, so ``xray-train phase1 --num-gpus 4 --config c.yaml --set k=v`` runs exactly
``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 4 -m xray_train.cli
phase1 --config c.yaml --set k=v``.

Also usable on its own: ``python -m xray_train.launch --num-gpus 4 [--accelerate-config FILE] phase1 ...``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from xray_train.errors import XrayTrainError

#: Shipped accelerate configs (configs/accelerate/); the working dir's copy wins over the installed one.
DDP_CONFIG = Path("configs") / "accelerate" / "ddp.yaml"

#: Set in every rank by torchrun / accelerate launch: a rank must never launch again.
_RANK_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE")


def inside_launcher() -> bool:
    return any(name in os.environ for name in _RANK_ENV)


def default_config_file() -> Path | None:
    """The DDP config in the working dir's configs/ if there is one, else the one installed with xray-train."""
    from xray_train.bundled import ROOT

    for root in (Path.cwd(), ROOT):
        if (root / DDP_CONFIG).is_file():
            return root / DDP_CONFIG
    return None


def build_command(num_gpus: int, cli_args: list[str], config_file: Path | str | None = None) -> list[str]:
    """The ``accelerate launch`` argv that runs ``xray_train.cli`` with ``cli_args`` on ``num_gpus`` GPUs.

    ``cli_args`` is what follows ``xray-train`` (``["phase1", "--config", ...]``), passed through as is.
    Without a config file the single-host DDP settings are spelled out as flags, so that a user's own
    ``accelerate config`` default cannot silently change the run.
    """
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int) or num_gpus < 1:
        raise XrayTrainError(f"--num-gpus: expected a whole number >= 1, got {num_gpus!r}")
    if not cli_args:
        raise XrayTrainError("--num-gpus: no xray-train command to launch (e.g. phase1 --config ...)")
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        config_file = Path(config_file)
        if not config_file.is_file():
            raise XrayTrainError(f"--accelerate-config: file not found: {config_file}")
        cmd += ["--config_file", str(config_file), "--num_processes", str(num_gpus)]
    else:
        if num_gpus > 1:
            cmd.append("--multi_gpu")
        cmd += [
            "--num_processes", str(num_gpus),
            "--num_machines", "1",
            # The run config decides bf16/fp16 (training.*); accelerate must not add its own.
            "--mixed_precision", "no",
            "--dynamo_backend", "no",
        ]
    return cmd + ["-m", "xray_train.cli", *cli_args]


def strip_launch_options(argv: list[str]) -> tuple[int | None, str | None, list[str]]:
    """Remove ``--num-gpus N`` / ``--num-gpus=N`` and ``--accelerate-config F`` from an argv.

    Returns ``(num_gpus or None, accelerate_config or None, remaining argv)``; the rest keeps its order.
    """
    num_gpus: int | None = None
    config: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--num-gpus", "--accelerate-config"):
            if not eq:
                if i + 1 >= len(argv):
                    raise XrayTrainError(f"{name}: expected a value")
                value = argv[i + 1]
                i += 1
            if name == "--num-gpus":
                try:
                    num_gpus = int(value)
                except ValueError:
                    raise XrayTrainError(f"--num-gpus: expected a whole number >= 1, got {value!r}") from None
            else:
                config = value
        else:
            rest.append(arg)
        i += 1
    return num_gpus, config, rest


def check_gpus(num_gpus: int) -> None:
    """Refuse more processes than visible GPUs: accelerate would start them anyway, as CPU ranks that
    each train the whole model. ``ACCELERATE_USE_CPU=true`` asks for CPU ranks on purpose (tests)."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return
    import torch

    found = torch.cuda.device_count()
    if found < num_gpus:
        seen = "no CUDA GPU" if found == 0 else f"only {found} CUDA GPU{'s' if found > 1 else ''}"
        raise XrayTrainError(
            f"--num-gpus {num_gpus}: this machine has {seen} (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); drop --num-gpus or lower it"
        )


def launch(num_gpus: int, cli_args: list[str], config_file: Path | str | None = None) -> None:
    """Replace this process with ``accelerate launch ...`` (never returns)."""
    if inside_launcher():
        raise XrayTrainError(
            "--num-gpus: already running under a distributed launcher (torchrun / accelerate launch); "
            "drop --num-gpus or the outer launcher"
        )
    check_gpus(num_gpus)
    if config_file is None:
        config_file = default_config_file()
    cmd = build_command(num_gpus, cli_args, config_file)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(cmd[0], cmd)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        num_gpus, config, rest = strip_launch_options(argv)
        if num_gpus is None:
            raise XrayTrainError(
                "usage: python -m xray_train.launch --num-gpus N [--accelerate-config FILE] phase1|phase2 ..."
            )
        launch(num_gpus, rest, config)
    except XrayTrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
