"""The champion and its history: `semalign promote`, `rollback`, `status` and the HTML `report`."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from semalign.cli.common import HomeOpt, JsonOpt, emit, load_settings, print_summary


def promote(version: str = typer.Argument(..., help="Registered model version to make champion."),
            home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
            reason: str = typer.Option("manual promotion", help="Recorded in the audit history.")):
    """Move the `champion` alias to a model version (and the store's current codebook with it)."""
    from semalign.deploy.registry import Registry
    from semalign.flows.lock import refresh_lock

    s = load_settings(home, None, write=True)
    with refresh_lock(s, "promote"):  # never in the middle of a refresh's own promotion
        reg = Registry(s)
        carried = _carry(s, reg, reg.get_version(version))  # what was onboarded stays servable
        res = {**reg.promote(version, reason=reason), "onboarded_items_carried": carried["carried"]}
    emit({"promote": res}, as_json, print_summary)


def rollback(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
             to: Optional[str] = typer.Option(None, "--to", help="Version to roll back to (default: the previous champion)."),
             reason: str = typer.Option("manual rollback", help="Recorded in the audit history.")):
    """Move `champion` back to the previous champion (one alias move, audited)."""
    from semalign.deploy.registry import Registry
    from semalign.flows.lock import refresh_lock

    s = load_settings(home, None, write=True)
    with refresh_lock(s, "rollback"):
        reg = Registry(s)
        target = to or reg.rollback_target()
        carried = _carry(s, reg, reg.get_version(target))
        res = {**reg.rollback(to=target, reason=reason), "onboarded_items_carried": carried["carried"]}
    emit({"rollback": res}, as_json, print_summary)


def vouch(version: str = typer.Argument(..., help="Registered model version logged before digests were recorded."),
          home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
          reason: str = typer.Option(..., help="Why these files are trusted (recorded in the audit history).")):
    """Record the SHA-256 digests of a version logged before semalign recorded them, so it can be served and
    compared against again (audited; refused for a version that already records its digests)."""
    from semalign.deploy.registry import Registry

    s = load_settings(home, None, write=True)
    emit({"vouch": Registry(s).vouch(version, reason=reason)}, as_json, print_summary)


def _carry(settings, registry, mv) -> dict:
    """Items onboarded under the champion carried into `mv`'s codebook version; none when the champion alias
    names a version that is gone (the move being made repairs it)."""
    from semalign.deploy.registry import DanglingAliasError
    from semalign.flows.promotion import carry_to

    try:
        return carry_to(settings, registry, mv)
    except DanglingAliasError:
        return {"carried": 0, "without_content": 0}


def unlock(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
           force: bool = typer.Option(False, "--force", help="Required: remove the lock whoever holds it."),
           reason: str = typer.Option("manual unlock", help="Recorded in the audit history.")):
    """Remove the project's refresh lock left by a holder that is gone (audited). A live holder notices at its
    next stage and stops; the lock frees itself anyway when its lease runs out."""
    from semalign.errors import InvalidInputError
    from semalign.flows.lock import force_unlock

    if not force:
        raise InvalidInputError("`semalign unlock` removes a lock someone may still hold: pass --force "
                                "(`semalign status` shows the holder and its lease)")
    s = load_settings(home, None, write=True)
    removed = force_unlock(s, reason=reason)
    emit({"unlock": removed or {"owner": None, "note": "no lock was held"}}, as_json, print_summary)


def status(home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
           history: int = typer.Option(10, help="Audit entries to show.")):
    """Who is champion, since when and why, the last gate's verdict, and the audit history."""
    # the registry's read side: MLflow's tables read directly where they can be (no MLflow import), else its client
    from semalign.deploy.registry import RegistryView
    from semalign.flows.lock import lock_holder

    s = load_settings(home, None)
    reg = RegistryView(s)
    res = reg.status()
    res["lock"] = lock_holder(s)  # who holds the project's refresh lock, and its lease
    res["history"] = [{k: r[k] for k in ("at", "action", "subject", "from_value", "to_value", "actor")}
                      | {"reason": (r["reason"] or "")[:200]} for r in reg.history(limit=history)]
    emit(res, as_json, _print_status)


def _print_status(r: dict) -> None:
    import time

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def text(v) -> str:  # what people wrote (a reason, a gate's summary) is printed as written, never as markup
        return escape(str(v))

    con = Console()
    champ = r["champion"] or {}
    con.print(f"[bold]{text(r['model'])}[/] champion: v{text(champ.get('version'))} (codebook "
              f"{text(champ.get('codebook_version'))}), since "
              f"{time.ctime(r['champion_since']) if r['champion_since'] else '-'}: {text(r['champion_reason'])}")
    if r.get("last_gate"):
        g = r["last_gate"]
        con.print(f"last gate: v{text(g['version'])} {'passed' if g['passed'] else 'FAILED'}: "
                  f"{text(g.get('summary', ''))}")
    if r.get("warning"):
        con.print(f"[yellow]warning:[/] {text(r['warning'])}")
    if r.get("lock"):
        lk = r["lock"]
        until = time.ctime(lk["expires_at"]) if lk.get("expires_at") else "-"
        con.print(f"locked by {text(lk['owner'])} since {time.ctime(lk['acquired_at'])}, lease until {until} "
                  "(`semalign unlock --force` if that holder is gone)")
    t = Table("when", "action", "subject", "from", "to", "by")
    for h in r["history"]:
        t.add_row(time.ctime(h["at"]), *(text(h[k]) for k in ("action", "subject", "from_value", "to_value")),
                  text(h["actor"] or ""))
    con.print(t)


def report(home: Optional[Path] = HomeOpt, out: Path = typer.Option(Path("semalign-report.html"), "--out", help="HTML file to write."),
           run_id: Optional[str] = typer.Option(None, help="MLflow run (default: the last refresh).")):
    """Write one self-contained HTML page of the last refresh (gates, AUC per bucket, drift, plots, audit)."""
    from semalign.deploy.report import build_report

    s = load_settings(home, None)
    path = build_report(s, out, run_id)
    sys.stdout.write(f"{path}\n")
