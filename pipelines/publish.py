"""What a stage shows in the Prefect UI: its headline numbers (a table artifact), where its output is (a markdown
artifact: paths as text, a link only where a browser can open one), the evaluation report with every figure
inline, and for a stage that was already done, an artifact that says it was skipped. Each stage's table and
markdown say whether its output was made by this code (the manifest's code fingerprint; vitok_core/fingerprint.py):
current, STALE with the command that reruns it, or unknown for an output written before fingerprints.

The UI renders artifact markdown in the browser, which cannot open the run's files: a figure must travel inside
the artifact as a data URI (a relative or local path gets a 404 from the Prefect server), and a file:// link does
nothing when clicked, so paths are shown as text. The building functions are free of Prefect; `publish` creates
the artifacts inside the running task.
"""

from __future__ import annotations

import base64
import os
import re
from typing import Any
from urllib.parse import quote

import fsspec

from pipelines.stages import code_state
from vitok_core.artifacts import join, read_json
from vitok_core.fingerprint import STALE, changed_text
from vitok_core.report import GRID_ROW_PX, format_metric, metric_title, split_png

# Largest inlined image (PNG bytes; base64 adds a third). Prefect's server sets no limit on artifact data (its
# ArtifactCreate schema has none), so the limit is ours: the report artifact lives in Prefect's database and the
# UI fetches it whole when its page opens, so each image stays a fraction of a second to fetch and decode, and a
# report with a reconstruction grid per setting stays at a few MB. Grids are cut between rows to fit (full
# resolution kept); anything that still does not fit is downscaled.
INLINE_MAX_BYTES = 512 * 1024
LOCATIONS = ("output", "export", "checkpoint", "samples", "report")  # manifest fields that are output URIs
EVALUATE_COLUMNS = ("psnr", "ssim", "rfid")


def artifact_key(stage: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return f"vitok-{stage.replace('_', '-')}"


# ------------------------------------------------------------------------------------------------
# Headline numbers
# ------------------------------------------------------------------------------------------------
NOT_COMPUTED = "n/a"  # not "-": the UI renders table cells as markdown, where a lone "-" is a list bullet


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else NOT_COMPUTED


def _metric(name: str, value: Any) -> str:
    shown = format_metric(name, value)
    return NOT_COMPUTED if shown == "-" else shown


def _pairs(stage: str, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    if stage == "ingest":
        counts = manifest.get("counts") or {}
        pairs = [(name, _number(counts.get(name), "d")) for name in ("read", "accepted", "rejected")]
        reasons = counts.get("rejected_by_reason") or {}
        return pairs + [(f"rejected: {reason}", _number(n, "d")) for reason, n in reasons.items()]
    if stage in ("train_ae", "train_flow"):
        final = manifest.get("final") or {}
        pairs = [
            ("status", str(manifest.get("status", NOT_COMPUTED))),
            ("final step", _number(manifest.get("step"), "d")),
            ("loss", _number(final.get("loss"), ".4g")),
            ("tokens/s", _number(final.get("tokens_per_s"), ".0f")),
        ]
        if "mfu" in final:
            pairs.append(("MFU", _number(final["mfu"], ".1%")))
        return [*pairs, ("wall time this run (s)", _number(manifest.get("wall_s_this_run"), ".0f"))]
    if stage == "cache_latents":
        return [(name, _number(manifest.get(name), "d")) for name in ("rows", "files", "classes")]
    return []


def _evaluate_rows(out: str) -> list[dict[str, str]]:
    """PSNR, SSIM and rFID per setting and model (the autoencoder, baselines, bicubic) from metrics.json, and the
    generated samples' gFID when they were scored."""
    metrics = read_json(join(out, "metrics.json"))
    generation = metrics.get("generation") or []
    # Every row has every column (the UI's table takes its columns from the rows): gFID only when samples were scored.
    columns = (*EVALUATE_COLUMNS, "gfid") if generation else EVALUATE_COLUMNS
    named = [(str(r["setting"]), str(r["model"]), r) for r in metrics.get("results") or []]
    named += [(str(g["reference_setting"]), "generated samples", g) for g in generation]
    return [
        {"setting": setting, "model": model, "images": str(row.get("images"))}
        | {metric_title(name): _metric(name, row.get(name)) for name in columns}
        for setting, model, row in named
    ]


def code_text(code: dict[str, Any]) -> str:
    """One line on the code that made an output (a `pipelines.stages.code_state`)."""
    if code["state"] == STALE:
        changed = changed_text(code["changed"])
        return f"STALE: made by code {code['recorded']}, this code is {code['current']} (changed: {changed})"
    if code["state"] == "current":
        return f"current ({code['recorded']})"
    return "unknown (the manifest predates code fingerprints)"


def headline_rows(
    stage: str, manifest: dict[str, Any], out: str, code: dict[str, Any] | None = None
) -> list[dict[str, str]]:
    """The table artifact of a stage: evaluate's metrics per setting and model, else (name, value) rows, the
    last one the code state when given (evaluate's goes in its markdown: its table has metric columns)."""
    if stage == "evaluate":
        return _evaluate_rows(out)
    rows = [{"name": name, "value": value} for name, value in _pairs(stage, manifest)]
    return rows + ([{"name": "code", "value": code_text(code)}] if code else [])


# ------------------------------------------------------------------------------------------------
# Output locations
# ------------------------------------------------------------------------------------------------
def console_url(uri: str) -> str | None:
    """A URL a browser can open for `uri`: the URI itself (http/https), the AWS S3 or Google Cloud Storage console
    for s3:// and gs://, else None. None for s3:// with a custom endpoint (MinIO, moto): no console shows it."""
    scheme, _, rest = uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    if scheme in ("http", "https"):
        return uri
    if scheme == "s3" and not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")):
        url = f"https://s3.console.aws.amazon.com/s3/buckets/{bucket}?prefix={quote(prefix.rstrip('/') + '/')}"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return url + (f"&region={region}" if region else "")
    if scheme == "gs":
        return f"https://console.cloud.google.com/storage/browser/{bucket}/{quote(prefix)}"
    return None


def locations(manifest: dict[str, Any], out: str) -> list[tuple[str, str]]:
    """(name, URI) of what the stage wrote: the output directory, then its export, checkpoint, samples, report."""
    found = {"output": out}
    for name in LOCATIONS[1:]:
        value = manifest.get(name)
        if isinstance(value, str) and value:
            found[name] = value
    return list(found.items())


def _code(text: str) -> str:
    return f"`{text.replace('`', '')}`"


def _markdown_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    header = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row.get(key, "").replace("|", "\\|") for key in header) + " |" for row in rows]


def summary_markdown(
    stage: str,
    manifest: dict[str, Any],
    out: str,
    rows: list[dict[str, str]],
    skipped: bool,
    code: dict[str, Any] | None = None,
) -> str:
    """The stage's outputs as text (plus a console link where one can open), its headline numbers, for a
    skipped stage a first line that says so, and the code state (`code`), with the rerun command when stale."""
    if skipped:
        lines = [f"## {stage}: skipped", "", "Already complete, made by an earlier run: nothing ran in this run.", ""]
    else:
        lines = [f"## {stage}: ran", ""]
    if code and code["state"] == STALE:
        lines += [f"**Stale code**: {code_text(code)[len('STALE: ') :]}.", "", f"Rerun: {_code(code['rerun'])}", ""]
    for name, uri in locations(manifest, out):
        url = console_url(uri)
        lines.append(f"- **{name}**: {_code(uri)}" + (f" ([open]({url}))" if url else ""))
    if code and code["state"] != STALE:  # a stale one is said above, with its rerun command
        lines.append(f"- **code**: {code_text(code)}")
    return "\n".join([*lines, "", *_markdown_table(rows), ""])


# ------------------------------------------------------------------------------------------------
# The evaluation report with its figures inline
# ------------------------------------------------------------------------------------------------
def _data_uri(png: bytes) -> str:
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def inline_report(out: str, max_bytes: int = INLINE_MAX_BYTES) -> str:
    """report.md with every figure as data URIs of at most `max_bytes` each (a reconstruction grid becomes
    several images of whole rows when it is larger), and a first line naming the full-resolution files."""
    with fsspec.open(join(out, "report.md"), "r") as f:
        text = f.read()
    for key, rel in (read_json(join(out, "metrics.json")).get("figures") or {}).items():
        with fsspec.open(join(out, rel), "rb") as f:
            parts = split_png(f.read(), max_bytes, GRID_ROW_PX if key.startswith("recon_") else None)

        def images(match: re.Match, parts: list[bytes] = parts) -> str:
            title, n = match.group(1), len(parts)
            return "\n\n".join(
                f"![{title}{f' ({i}/{n})' if n > 1 else ''}]({_data_uri(part)})" for i, part in enumerate(parts, 1)
            )

        text = re.sub(rf"!\[([^\]]*)\]\({re.escape(rel)}\)", images, text)
    return f"Files (full-resolution figures, per-image scores): {_code(out)}\n\n{text}"


# ------------------------------------------------------------------------------------------------
# Prefect
# ------------------------------------------------------------------------------------------------
def publish(
    stage: str, manifest: dict[str, Any], out: str, skipped: bool = False, rerun: str | None = None
) -> dict[str, Any]:
    """The stage's artifacts on the current Prefect run. A skipped stage gets one markdown artifact without a key:
    it belongs to this run's page, and the stage's keyed artifacts keep showing the run that made the output.
    `rerun`: the command that reruns the stage (pipelines.stages.rerun_command with the run's preset and
    overrides). Returns the code state."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    key = artifact_key(stage)
    code = code_state(stage, manifest)
    if code["state"] == STALE and rerun:
        code["rerun"] = rerun
    rows = headline_rows(stage, manifest, out, code)
    text = summary_markdown(stage, manifest, out, rows, skipped, code)
    if skipped:
        create_markdown_artifact(text, description=f"{stage}: skipped, already complete")
        return code
    if rows:
        create_table_artifact(rows, key=key, description=f"{stage}: headline numbers")
    create_markdown_artifact(text, key=f"{key}-output", description=f"{stage}: output locations and numbers")
    url = console_url(out)
    if url:
        create_link_artifact(url, link_text=f"{stage} output", key=f"{key}-link", description=f"{stage} output")
    if stage == "evaluate":
        create_markdown_artifact(inline_report(out), key="vitok-evaluate-report", description="evaluation report")
    return code
