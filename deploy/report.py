"""`semalign report`: one self-contained HTML page of the last refresh (versions, gate verdict with every check,
AUC per item bucket for challenger and champion, drift numbers, plots inlined), read back from MLflow."""
from __future__ import annotations

import base64
import html
import tempfile
import time
from pathlib import Path

from semalign.config import Settings


def _table(rows: list[list], head: list[str]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "" if v is None else str(v)


def build_report(settings: Settings, out: Path, run_id: str | None = None) -> Path:
    from semalign.deploy.registry import Registry

    reg = Registry(settings)
    if run_id is None:
        runs = reg.client.search_runs([reg.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
        if not runs:
            from semalign.errors import NotFoundError

            raise NotFoundError("no refresh has been logged yet: run `semalign run` first")
        run = runs[0]
    else:
        run = reg.client.get_run(run_id)
    rid = run.info.run_id
    ev = reg.run_artifact_json(rid, "evaluation.json") or {}
    val = reg.run_artifact_json(rid, "validation_report.json") or {}
    status = reg.status()
    parts = [f"<h1>semalign refresh {html.escape(run.info.run_name or rid)}</h1>",
             f"<p>started {time.ctime(run.info.start_time / 1000)}; run <code>{rid}</code>; "
             f"model <code>{html.escape(settings.model_name)}</code></p>"]
    t = run.data.tags
    parts.append(_table([["codebook version", t.get("codebook_version")], ["encoder version", t.get("encoder_version")],
                         ["data hash", t.get("data_hash")], ["gate", t.get("gate")],
                         ["champion now", (status.get("champion") or {}).get("version")],
                         ["current codebook", status.get("current_codebook")]], ["", ""]))
    verdict = "passed" if val.get("passed") else "FAILED"
    parts.append(f"<h2>Gates: {verdict}</h2><p>{html.escape(val.get('summary', ''))}</p>")
    if t.get("data_docs"):  # the Great Expectations Data Docs of the suites behind these gates
        docs = html.escape(t["data_docs"], quote=True)
        parts.append(f"<p>Great Expectations Data Docs: <a href='{docs}'>{docs}</a></p>")
    rows = []
    for g in [val.get("input", {})] + val.get("gates", []):
        for c in g.get("checks", []):
            rows.append([g.get("gate"), c["name"], "pass" if c["passed"] else "FAIL", c.get("observed"), c.get("expected")])
    if rows:
        parts.append(_table(rows, ["gate", "check", "result", "observed", "expected"]))
    cmp = ev.get("compared") or {}
    ch, cp = cmp.get("challenger") or ev.get("challenger") or {}, ev.get("champion") or {}
    if ch:
        on = (f": the {cmp['events']} of {cmp['test_events']} events the champion never trained on"
              if cmp.get("excludes_champion_training") else "")
        parts.append(f"<h2>AUC / GAUC per item bucket (test window{on})</h2>")
        parts.append(_table([[b, ch[b]["auc"], (cp.get(b) or {}).get("auc"), ch[b]["gauc"], (cp.get(b) or {}).get("gauc"),
                              ch[b]["n_events"]] for b in ch],
                            ["bucket", "challenger AUC", "champion AUC", "challenger GAUC", "champion GAUC", "events"]))
    metrics = sorted(run.data.metrics.items())
    parts.append("<h2>Metrics</h2>" + _table([[k, v] for k, v in metrics], ["metric", "value"]))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = reg.mlflow.artifacts.download_artifacts(run_id=rid, artifact_path="plots", dst_path=tmp,
                                                            tracking_uri=reg.tracking_uri)
            for png in sorted(Path(local).glob("*.png")):
                b64 = base64.b64encode(png.read_bytes()).decode()
                parts.append(f"<h3>{html.escape(png.stem.replace('_', ' '))}</h3><img alt='{png.stem}' src='data:image/png;base64,{b64}'/>")
        except Exception as e:  # a run without plots still gets its report
            parts.append(f"<p>plots unavailable: {html.escape(str(e))}</p>")
    hist = reg.history(limit=20)
    if hist:
        parts.append("<h2>Audit history</h2>" + _table(
            [[time.ctime(h["at"]), h["action"], h["subject"], h["from_value"], h["to_value"], h["actor"]] for h in hist],
            ["when", "action", "subject", "from", "to", "by"]))
    style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
             "th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}")
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>semalign report</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
