"""Mutation check of the test suite, on demand (not part of CI): does each hand-written bug make its tests fail?

    python tests/mutation/run_mutants.py              # every mutant of tests/mutation/mutants.py
    python tests/mutation/run_mutants.py --list       # names, files, tests
    python tests/mutation/run_mutants.py NAME ...     # only these (substring match)

What it does:

1. Copies the repository (the files git tracks, plus untracked ones it does not ignore, plus the built
   moco_fast/_C*.so) into a temporary folder and links ``moco_fast/kernels`` to the copy's ``kernels/``
   (an editable install maps that package to the original tree).
2. Runs pytest there with PYTHONPATH = the copy and the editable install's import hook removed, and first
   checks that ``moco_fast``, ``moco_fast.kernels`` and ``moco_fast.torch_backend`` are imported from the
   copy (it exits 3 otherwise). Two canaries prove it: a copy whose moco_fast/__init__.py, then whose
   kernels/__init__.py, raises must fail to import.
3. Runs every selected mutant's tests unmutated (they must pass: a baseline), then for each mutant writes
   the one replacement into the copy, runs its tests (``-x``), and restores the file.

A mutant is *killed* when its tests fail (pytest exit status 1), *survived* when they pass, *error* when
the run could not judge it (collection error, timeout, the replacement not found exactly once). Exit
status: 0 when every mutant is killed, 1 otherwise, 2 when the baseline or a canary fails.
Bytecode is not written (PYTHONDONTWRITEBYTECODE=1), so a restored file is never shadowed by a stale .pyc.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from mutants import MUTANTS, Mutant  # noqa: E402

# Run inside the copy: drop the editable install's finder, import the package, check where it came from.
_BOOT = r"""
import os, sys
root = os.environ["MOCO_FAST_MUTATION_COPY"]
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
import moco_fast, moco_fast.kernels, moco_fast.torch_backend
for m in (moco_fast, moco_fast.kernels, moco_fast.torch_backend):
    if not os.path.realpath(m.__file__).startswith(os.path.realpath(root) + os.sep):
        print(f"mutation check: {m.__name__} imported from {m.__file__}, not from the copy {root}", flush=True)
        sys.exit(3)
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def copy_repository(dest: Path) -> None:
    """The working tree's files (tracked + untracked-not-ignored), the built extension, and the kernels link."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [f.decode() for f in listed if f] + [
        os.path.relpath(p, REPO) for p in glob.glob(str(REPO / "moco_fast/_C*.so"))
    ]
    for rel in files:
        src = REPO / rel
        if not src.is_file():
            continue  # deleted in the working tree
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    (dest / "moco_fast" / "kernels").symlink_to(Path("..") / "kernels", target_is_directory=True)


def run_pytest(copy: Path, args: list[str], timeout: float) -> tuple[int, str, float]:
    """(exit status, last lines of output, seconds) of pytest ``args`` in the copy; 124 on timeout."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", MOCO_FAST_MUTATION_COPY=str(copy))
    env.pop("MOCO_FAST_RANDOM_SEED", None)  # the same data as the baseline
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("TRITON_INTERPRET", "1")  # before the boot code imports triton (as conftest does)
    except ImportError:
        pass
    cmd = [sys.executable, "-c", _BOOT, "-x", "-q", "-p", "no:cacheprovider", *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timeout", time.monotonic() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
    return proc.returncode, tail, time.monotonic() - start


def apply(copy: Path, mutant: Mutant) -> str:
    """Write the mutant into the copy; returns the original text. Raises if ``old`` is not there once."""
    path = copy / mutant.path
    text = path.read_text()
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(f"{mutant.name}: the text to replace occurs {count} times in {mutant.path}")
    path.write_text(text.replace(mutant.old, mutant.new))
    return text


def canary(copy: Path, rel: str, timeout: float) -> bool:
    """A copy whose ``rel`` raises at import must fail: proof that the copy's code is what runs."""
    path = copy / rel
    original = path.read_text()
    path.write_text(original + '\nraise RuntimeError("mutation canary")\n')
    try:
        rc, tail, _ = run_pytest(copy, ["tests/test_numerics.py"], timeout)
    finally:
        path.write_text(original)
    return rc != 0 and "mutation canary" in tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = parser.parse_args(argv)
    selected = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if args.list or not selected:
        for m in selected:
            print(f"{m.name:45s} {m.path:38s} {' '.join(m.tests)}")
        return 0 if selected else 1

    copy = Path(tempfile.mkdtemp(prefix="moco_fast_mutants_"))
    try:
        copy_repository(copy)
        print(f"copy: {copy}", flush=True)
        for rel in ("moco_fast/__init__.py", "kernels/__init__.py"):
            if not canary(copy, rel, args.timeout):
                print(f"canary failed: a raising {rel} in the copy did not break the run", flush=True)
                return 2
        print("canaries: the copy's moco_fast and kernels are what runs", flush=True)
        selections = list(dict.fromkeys(m.tests for m in selected))  # each distinct selection once
        for tests in selections:
            rc, tail, secs = run_pytest(copy, list(tests), args.timeout)
            if rc != 0:
                print(f"baseline FAILED ({' '.join(tests)}), exit {rc}:\n{tail}", flush=True)
                return 2
        print(f"baseline: the {len(selections)} test selections pass unmutated", flush=True)

        results = []
        for m in selected:
            try:
                original = apply(copy, m)
            except ValueError as err:
                results.append((m, "error", str(err), 0.0))
                print(f"ERROR     {m.name}: {err}", flush=True)
                continue
            try:
                rc, tail, secs = run_pytest(copy, list(m.tests), args.timeout)
            finally:
                (copy / m.path).write_text(original)
            status = {0: "survived", 1: "killed"}.get(rc, "error")
            detail = tail.splitlines()[-1] if tail else ""
            results.append((m, status, detail if status != "error" else f"exit {rc}: {tail}", secs))
            print(f"{status.upper():9s} {m.name:45s} {secs:6.1f} s  {detail}", flush=True)
    finally:
        if args.keep:
            print(f"kept: {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)

    killed = sum(1 for _, s, _, _ in results if s == "killed")
    print(f"\n{killed} of {len(results)} mutants killed", flush=True)
    for m, status, detail, _ in results:
        if status != "killed":
            print(f"  {status}: {m.name} ({m.path}) {m.why} -- {detail}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
