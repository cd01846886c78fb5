"""torch.export of an image backbone's frozen stages in a child process, for the int8 build
(backbones/int8_stages.py), so that the serving process never traces.

torch.export (strict or not) patches nn.Module.__call__ and __getattr__ process-wide while it
traces: an eager Predict batch on another thread meanwhile was routed into its tracer and
failed INTERNAL (lite0 at 224 px), and the export failed too. The child does the export
alone: it builds the backbone's architecture from its catalog spec (`build_trunk(None)`),
loads the parent's frozen weights into it, exports each requested stage with a dynamic batch
dimension on the example inputs it is given, and saves each ExportedProgram with
`torch.export.save`. The parent loads them (`torch.export.load`), checks their weights are its
own, and quantises them (PT2E prepare/convert patch nothing).

Files in the private work dir: `weights.pt` (the trunk's state dict), `inputs.pt` ({stage
index as str: example batch}, plain tensors read with weights_only=True), and the child's
`stage<i>.pt2`. The child runs with one torch thread, at the calling thread's nice value or
lower (Linux: a process started from a thread inherits its nice), under a timeout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

# Importing torch and timm, building the trunk and exporting 7 lite0 stages: ~10-20 s on a
# quiet 2-CPU machine; at nice 10 beside a busy Predict it gets a fraction of a core.
EXPORT_TIMEOUT_SECONDS = 600.0
_POLL_SECONDS = 0.25


class ChildExportFailed(RuntimeError):
    """The export child exited non-zero, timed out or left a stage out (a candidate failure)."""


def export_stages_in_child(
    backbone: str,
    trunk: torch.nn.Module,
    examples: Mapping[int, torch.Tensor],
    cancelled: Callable[[], bool],
    on_cancel: Callable[[], BaseException],
    *,
    timeout_seconds: float = EXPORT_TIMEOUT_SECONDS,
) -> dict[int, torch.export.ExportedProgram]:
    """Stage index -> that stage of `backbone`'s trunk exported in a child process, its batch
    dimension dynamic, traced on `examples[index]` (all calibration rows: a batch of 1 would be
    specialised to 1). `trunk`: the parent's trunk, whose weights the child loads. Raises
    ChildExportFailed, or `on_cancel()` once `cancelled()` (the child is killed)."""
    with tempfile.TemporaryDirectory(prefix="transfer-int8-export-") as work:
        work_dir = Path(work)
        state = {name: t.detach().cpu() for name, t in trunk.state_dict().items()}
        torch.save(state, work_dir / "weights.pt")
        inputs = {str(i): t.detach().cpu() for i, t in examples.items()}
        torch.save(inputs, work_dir / "inputs.pt")
        _run_child(backbone, work_dir, cancelled, on_cancel, timeout_seconds)
        exported = {}
        for index in examples:
            path = work_dir / f"stage{index}.pt2"
            if not path.is_file():
                raise ChildExportFailed(f"the export child left stage {index} out")
            exported[index] = torch.export.load(path)
        return exported


def _run_child(
    backbone: str,
    work_dir: Path,
    cancelled: Callable[[], bool],
    on_cancel: Callable[[], BaseException],
    timeout_seconds: float,
) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # The child imports this package from where the parent did (an editable install may
    # point elsewhere, e.g. from a git worktree).
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", __name__, backbone, str(work_dir), "--niceness", str(_nice())]
    stderr_path = work_dir / "stderr.txt"
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env
        )
        deadline = time.monotonic() + timeout_seconds
        try:
            while True:
                try:
                    returncode = child.wait(timeout=_POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if cancelled():
                    raise on_cancel()
                if time.monotonic() > deadline:
                    raise ChildExportFailed(
                        f"the export child took over {timeout_seconds:.0f}s (killed)"
                    )
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    if returncode != 0:
        lines = stderr_path.read_text(errors="replace").strip().splitlines()
        last = lines[-1] if lines else "(no output)"
        raise ChildExportFailed(f"the export child exited with {returncode}: {last}")


def _nice() -> int:
    """The calling thread's nice value (Linux: per thread), 0 elsewhere."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    except OSError:
        return 0


def _export_in_this_process(backbone: str, work_dir: Path) -> None:
    """The child's work: never run in the serving process (it patches nn.Module)."""
    from transfer_service.backbones.catalog import default_catalog

    specs = {spec.name: spec for spec in default_catalog()}
    if backbone not in specs:
        raise SystemExit(f"unknown backbone {backbone!r}")
    trunk = specs[backbone].build_trunk(None)  # the architecture; the parent's weights next
    weights = torch.load(work_dir / "weights.pt", map_location="cpu", weights_only=True)
    trunk.load_state_dict(weights, strict=True)
    trunk.requires_grad_(False)
    trunk.eval()
    trunk.to(memory_format=torch.channels_last)  # as the cache loads image trunks
    inputs = torch.load(work_dir / "inputs.pt", map_location="cpu", weights_only=True)
    for key, example in inputs.items():
        program = export_stage(trunk.stages[int(key)], example)
        torch.export.save(program, work_dir / f"stage{int(key)}.pt2")


def export_stage(stage: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """`stage` traced on `example` with the batch dimension dynamic. Patches nn.Module
    process-wide while it runs: only in the child, or in a process that serves nothing (the
    benchmark)."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(stage, (example,), dynamic_shapes=({0: batch},))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("backbone")
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--niceness", type=int, default=0)
    args = parser.parse_args(argv)
    if args.niceness > 0 and sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, 0, max(os.getpriority(os.PRIO_PROCESS, 0), args.niceness))
    torch.set_num_threads(1)
    _export_in_this_process(args.backbone, args.work_dir)


if __name__ == "__main__":
    main()
