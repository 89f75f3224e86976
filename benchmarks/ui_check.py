"""The Prefect UI in a real browser: does a run's page show everything the run produced?

    .venv/bin/python benchmarks/ui_check.py [--out /tmp/ui_check] [--reuse]   # 2-3 minutes on 2 cores

Needs Chromium (Debian: `apt-get install -y chromium`). Starts `prefect server start --host 127.0.0.1` on a free
port with its own PREFECT_HOME under --out, runs the tiny pipeline through it twice with `vitok run` (the demo
photos, a few steps per stage, one 64p and one 256p evaluation setting so that a reconstruction grid of real
photo crops is large enough to be cut into parts), registers the deployments (without serving them), and takes
headless Chromium screenshots of:
    1-run-artifacts.png     the first run's Artifacts tab (one card per artifact)
    2-report.png            the evaluation report artifact: tables and every figure inline
    3-train-ae.png          train_ae's table artifact: final step, loss, tokens/s
    4-evaluate.png          evaluate's table artifact: PSNR, SSIM, rFID per setting and model
    5-ingest-output.png     ingest's output artifact: where it wrote, as text
    6-run-logs.png          the first run's log: training steps with loss and ETA
    7-skipped-run.png       the second run (every stage already done): flow and task runs named Skipped
    8-skipped-artifacts.png the second run's Artifacts tab: one "skipped" note per stage
    9-run-form.png          the pipeline deployment's run form: descriptions, choices, overrides list
and prints what the Prefect API holds for the same pages (artifact sizes, state names), so the screenshots can be
checked against it. Everything stays under --out (outside git); the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

VITOK = str(Path(sys.executable).parent / "vitok")
# As tests/test_pipelines.py FAST: seconds per stage; plus a 256p setting whose grid exceeds the inline limit.
SMALL = [
    "data.budgets=[64]", "data.budget_switch=[]",
    "train.steps=8", "train.batch_size=4", "train.checkpoint_every=4", "train.log_every=2", "train.workers=1",
    "flow.steps=4", "flow.batch_size=8", "flow.micro_batch_size=4", "flow.checkpoint_every=4", "flow.log_every=2",
    "flow.workers=1", "flow.sample.per_class=1", "flow.sample.rows=4", "flow.sample.cols=4", "flow.sample.steps=2",
    "evaluate.settings=[{name: 64p, size: 64, mode: center_crop}, {name: 256p, size: 256, mode: center_crop}]",
    "evaluate.generation_setting=64p", "evaluate.max_images=8", "evaluate.images_per_task=4",
    "cache.actors=1", "evaluate.actors=1",
]  # fmt: skip
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(out: Path, port: int) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port in its own process group; returns when /api/health answers."""
    env = {**os.environ, "PREFECT_HOME": str(out / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}  # the UI's default is port 4200  # fmt: skip
    log = open(out / "server.log", "w")  # noqa: SIM115 (closed with the process)
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read()
            return server
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError(f"the Prefect server did not come up: see {out / 'server.log'}") from None
            time.sleep(1)


def run_pipeline(out: Path, api: str, label: str) -> float:
    """`vitok run` of the tiny DAG against the server; returns its wall seconds."""
    roots = [f"{key}={out / 'runs'}" for key in ("ingest.root", "train.root", "cache.root", "flow.root",
                                                  "evaluate.root")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PREFECT_API_URL=api, PREFECT_HOME=str(out / "prefect-client"))
    started = time.time()
    with open(out / f"{label}.log", "w") as log:
        done = subprocess.run([VITOK, "run", "--preset", "tiny", *SMALL, *roots], cwd=out, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=1800)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"vitok run ({label}) failed: see {out / f'{label}.log'}")
    return time.time() - started


def api_view(api: str) -> dict[str, Any]:
    """The two runs (oldest first), their artifacts and task runs, and the pipeline deployment, from the API."""
    os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=os.environ.get("PREFECT_HOME", "/tmp/ui_check/prefect-client"))
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    from pipelines.deploy import deployments

    ids = [d.apply() for d in deployments()]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(sort=FlowRunSort.START_TIME_ASC)
        view: dict[str, Any] = {"deployment": str(ids[0]), "runs": []}
        for run in runs[-2:]:
            only = FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            artifacts = client.read_artifacts(flow_run_filter=only)
            tasks = client.read_task_runs(flow_run_filter=only)
            view["runs"].append({
                "id": str(run.id), "state": run.state.name if run.state else None,
                "tasks": {t.name: t.state.name for t in tasks if t.state},
                "artifacts": [{"id": str(a.id), "key": a.key, "type": a.type, "chars": len(str(a.data or "")),
                               "head": str(a.data or "")[:80]} for a in artifacts],
            })  # fmt: skip
    return view


class Browser:
    """Headless Chromium driven through its DevTools protocol (with `websockets`, which Prefect installs): each page
    is captured once the text it must show is on it, not after a guessed delay, as plain --screenshot would."""

    def __init__(self, chromium: str, profile: Path) -> None:
        shutil.rmtree(profile, ignore_errors=True)  # a fresh profile: nothing carried over from an earlier check
        port = free_port()
        self.process = subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.time() + 60
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.time() > deadline or self.process.poll() is not None:
                    raise RuntimeError("Chromium's DevTools endpoint did not come up") from None
                time.sleep(0.5)
        from websockets.sync.client import connect

        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.calls = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:  # events arrive in between; the answer carries our id
            message = json.loads(self.socket.recv())
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def shows(self, text: str) -> bool:
        expression = f"!!document.body && document.body.innerText.includes({json.dumps(text)})"
        return bool(self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value"))

    def click(self, text: str) -> bool:
        """Click the innermost element whose text is exactly `text` (a tab: the UI ignores ?tab= on first load)."""
        script = f"""(() => {{
            const hit = Array.from(document.querySelectorAll("body *"))
                .find(e => e.children.length === 0 && (e.innerText || "").trim() === {json.dumps(text)});
            if (hit) hit.click();
            return !!hit;
        }})()"""
        return bool(self.call("Runtime.evaluate", expression=script, returnByValue=True)["result"].get("value"))

    def wait(self, text: str, deadline: float) -> bool:
        while not (found := self.shows(text)) and time.time() < deadline:
            time.sleep(0.5)
        return found

    def screenshot(self, url: str, path: Path, size: tuple[int, int], wait_for: str, click: str | None = None,
                   timeout_s: float = 30) -> bool:  # fmt: skip
        """`url` at `size` (CSS px) into `path`, after clicking `click` (when given) and once `wait_for` is on the page
        and its images are decoded (or after `timeout_s`); returns whether the text was found."""
        self.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1], deviceScaleFactor=1,
                  mobile=False)  # fmt: skip
        self.call("Page.navigate", url=url)
        deadline = time.time() + timeout_s
        if click is not None and self.wait(click, deadline):
            self.click(click)
        found = self.wait(wait_for, deadline)
        images = "Array.from(document.images).every(i => i.complete)"
        while time.time() < deadline and not self.call("Runtime.evaluate", expression=images)["result"].get("value"):
            time.sleep(0.5)
        time.sleep(1.5)  # charts and fonts settle
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return found

    def close(self) -> None:
        self.socket.close()
        os.killpg(self.process.pid, signal.SIGTERM)  # the Chromium we started, with its helper processes
        self.process.wait(timeout=30)


def pages(ui: str, view: dict[str, Any]) -> list[tuple[str, str, tuple[int, int], str, str | None]]:
    """(file name, URL, viewport, text the page must show, tab to click first) of every screenshot."""
    first, second = view["runs"]
    key = {a["key"]: a["id"] for a in first["artifacts"] if a["key"]}
    run, skipped = f"{ui}/runs/flow-run/{first['id']}", f"{ui}/runs/flow-run/{second['id']}"
    artifact = f"{ui}/artifacts/artifact"
    return [
        ("1-run-artifacts", run, (1400, 2400), "vitok-evaluate-report", "Artifacts"),
        ("2-report", f"{artifact}/{key['vitok-evaluate-report']}", (1400, 9000), "ViTok evaluation report", None),
        ("3-train-ae", f"{artifact}/{key['vitok-train-ae']}", (1400, 900), "final step", None),
        ("4-evaluate", f"{artifact}/{key['vitok-evaluate']}", (1400, 900), "bicubic", None),
        ("5-ingest-output", f"{artifact}/{key['vitok-ingest-output']}", (1400, 900), "ingest: ran", None),
        ("6-run-logs", run, (1400, 3000), "train_ae: step", "Logs"),
        ("7-skipped-run", skipped, (1400, 1200), "Skipped", "Task Runs"),
        ("8-skipped-artifacts", skipped, (1400, 2400), "already complete", "Artifacts"),
        ("9-run-form", f"{ui}/deployments/deployment/{view['deployment']}/run", (1400, 1400), "Config preset", None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/ui_check", help="everything the check writes (outside git)")
    parser.add_argument("--reuse", action="store_true", help="keep --out's server data and runs: screenshots only")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("ui_check: no chromium on PATH (Debian: apt-get install -y chromium)")
    if not args.reuse:
        shutil.rmtree(out, ignore_errors=True)
    (out / "screens").mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(out, port)
    ui, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api"
    try:
        if not args.reuse:
            print(f"first run (every stage runs): {run_pipeline(out, api, 'run1'):.0f} s", flush=True)
            print(f"second run (every stage done): {run_pipeline(out, api, 'run2'):.0f} s", flush=True)
        view = api_view(api)
        (out / "api_view.json").write_text(json.dumps(view, indent=2))
        print(json.dumps(view, indent=2))
        browser = Browser(chromium, out / "chromium-profile")
        try:
            for name, url, size, wait_for, click in pages(ui, view):
                found = browser.screenshot(url, out / "screens" / f"{name}.png", size, wait_for, click)
                print(f"{name}: {url} ({'shows' if found else 'MISSING'} {wait_for!r})", flush=True)
        finally:
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # our server's process group only
        server.wait(timeout=60)
    print(f"screenshots in {out / 'screens'}")


if __name__ == "__main__":
    main()
