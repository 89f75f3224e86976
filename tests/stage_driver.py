"""A stage driver in a process of its own, with a local Ray of its own, for tests whose Ray workers must see
another environment than the session's Ray (which started with the moto endpoint in AWS_ENDPOINT_URL), e.g.
the fault-injecting proxy of tests/s3_proxy.py.

    with StageDriver({"AWS_ENDPOINT_URL": proxy.url}, log=tmp_path / "driver.log") as driver:
        answer = driver.run("ingest", ["ingest.source=s3://b/raw", ...])   # {"ok": True, "manifest": {...}}
        answer = driver.run("train_ae", [...])                             # {"ok": False, "error": "..."}

The child (`python -m tests.stage_driver`) starts Ray once (jobs.common.init_ray, which forwards the AWS
variables of its environment to the workers), then runs one stage per command: a JSON line on stdin
{"stage", "overrides", "preset"} -> `jobs.<stage>.run(load_config(preset, overrides))` -> one JSON line on
stdout after MARK. A failed stage is an answer (with the error and its causes), not the end of the process;
before it is sent, the driver's Ray is restarted, as a failed Ray job's workers end with its driver and a
rerun is a new job with new workers. Reused, they need not be sound: Ray Data cancels the tasks of a failed
dataset by raising KeyboardInterrupt in them, and one that lands in the middle of an import leaves that
worker with half-initialised modules (seen in CI: the rerun's `import s3fs` failed with "module aiohttp has
no attribute http_exceptions" in a worker whose first import of it had been interrupted).
Its log (Ray's, the jobs') goes to `log`.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MARK = "@@stage-driver@@ "
REPO = Path(__file__).resolve().parent.parent


class StageDriver:
    def __init__(self, env: dict[str, str], log: Path, num_cpus: int = 2) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        self.log_path, self.num_cpus = log, num_cpus
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> StageDriver:
        self._log = open(self.log_path, "w")  # closed in __exit__
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stage_driver", str(self.num_cpus)],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        return self

    def run(self, stage: str, overrides: list[str], preset: str = "tiny") -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"stage": stage, "overrides": overrides, "preset": preset}) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        raise RuntimeError(f"stage driver exited ({self.proc.wait()}); its log: {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _chain(err: BaseException) -> list[str]:
    out, seen = [], set()
    while err is not None and id(err) not in seen and len(out) < 8:
        seen.add(id(err))
        out.append(f"{type(err).__name__}: {err}"[:5000])
        err = err.__cause__ or err.__context__
    return out


def main() -> None:
    import ray

    from jobs.common import init_ray, setup_logging
    from vitok_core.config import load_config

    setup_logging()
    num_cpus = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    init_ray(num_cpus=num_cpus)
    stdout = sys.stdout
    sys.stdout = sys.stderr  # the jobs' prints and progress go to the log; stdout carries only answers
    for line in sys.stdin:
        command = json.loads(line)
        try:
            module = importlib.import_module(f"jobs.{command['stage']}")
            manifest = module.run(load_config(command.get("preset", "tiny"), command["overrides"]))
            answer = {"ok": True, "manifest": manifest}
        except Exception as err:
            answer = {"ok": False, "error": f"{type(err).__name__}: {err}", "chain": _chain(err)}
            started = time.monotonic()
            ray.shutdown()  # the failed job's workers go with it (see the module docstring)
            init_ray(num_cpus=num_cpus)
            answer["ray_restart_s"] = round(time.monotonic() - started, 2)
        stdout.write(MARK + json.dumps(answer, default=str) + "\n")
        stdout.flush()


if __name__ == "__main__":
    main()
