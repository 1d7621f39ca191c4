"""The project lock cannot wedge or race: a lease that runs out when its holder is gone, compare-and-delete, a
heartbeat that keeps a live holder's lease, `semalign unlock --force` (audited) and a holder that notices, the
Postgres advisory lock, and the commands that respect a running refresh."""
import os
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from conftest import run_cli as _cli

from semalign import state
from semalign.config import Settings
from semalign.flows.errors import RefreshLockedError
from semalign.flows.lock import RefreshLock, force_unlock, refresh_lock

POSTGRES = os.environ.get("SEMALIGN_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _row(s: Settings):
    with state.engine(s.resolved_state_url()).connect() as c:
        return c.execute(sa.select(state.locks).where(state.locks.c.name == f"refresh:{s.feast_project}")).first()


def test_a_holder_on_another_host_frees_the_lock_when_its_lease_runs_out(tmp_path):
    s = Settings(home=tmp_path, refresh_lock_lease_s=60)
    now = time.time()
    with state.engine(s.resolved_state_url()).begin() as c:  # a holder on a host that died 1.5 s before its lease
        c.execute(state.locks.insert().values(name=f"refresh:{s.feast_project}", owner="gone-host:4242:abcd",
                                              acquired_at=now - 100, expires_at=now + 1.5))
    with pytest.raises(RefreshLockedError, match="gone-host:4242") as e:
        RefreshLock(s).acquire()
    assert "unlock --force" in str(e.value)
    time.sleep(2.0)
    with refresh_lock(s) as lock:
        assert _row(s).owner == lock.owner
    assert _row(s) is None   # its holder deleted its own row


def test_a_killed_holder_of_this_host_is_taken_over_at_once(tmp_path):
    s = Settings(home=tmp_path)
    code = ("import sys, time; from semalign.config import Settings; from semalign.flows.lock import RefreshLock; "
            f"RefreshLock(Settings(home=r'{tmp_path}')).acquire(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RefreshLockedError):
        RefreshLock(s).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    with refresh_lock(s):  # its pid is gone: no need to wait for the lease
        pass


def test_a_lease_that_ran_out_frees_the_lock_even_while_its_holder_process_exists(tmp_path):
    import socket

    s = Settings(home=tmp_path, refresh_lock_lease_s=60)
    day_ago = time.time() - 86_400
    with state.engine(s.resolved_state_url()).begin() as c:  # PID 1 exists on every host, its lease ran out a day ago
        c.execute(state.locks.insert().values(name=f"refresh:{s.feast_project}", owner=f"{socket.gethostname()}:1:dead",
                                              acquired_at=day_ago - 60, expires_at=day_ago))
    with refresh_lock(s) as lock:
        assert _row(s).owner == lock.owner


def test_a_stopped_holder_loses_the_lock_when_its_lease_runs_out_and_notices(tmp_path):
    s = Settings(home=tmp_path, refresh_lock_lease_s=1.0)
    code = ("import sys, time; from semalign.config import Settings; from semalign.flows.lock import RefreshLock; "
            f"lock = RefreshLock(Settings(home=r'{tmp_path}', refresh_lock_lease_s=1.0)).acquire(); "
            "print('held', flush=True); sys.stdin.readline(); time.sleep(1.0); print(lock.lost, flush=True)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        proc.send_signal(signal.SIGSTOP)       # alive, renewing nothing
        time.sleep(1.5)                        # past its lease
        with refresh_lock(s) as lock:
            assert _row(s).owner == lock.owner
            proc.send_signal(signal.SIGCONT)
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "True"   # its next heartbeat found its row gone
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def test_the_audit_names_the_process_user_not_what_logname_says(tmp_path):
    import pwd

    s = Settings(home=tmp_path)
    with state.engine(s.resolved_state_url()).begin() as c:
        c.execute(state.locks.insert().values(name=f"refresh:{s.feast_project}", owner="other-host:7:abcd",
                                              acquired_at=time.time(), expires_at=time.time() + 60))
    proc = subprocess.run([sys.executable, "-m", "semalign.cli", "unlock", "--force"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "SEMALIGN_HOME": str(tmp_path), "LOGNAME": "someone-else",
                                            "USER": "someone-else"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    with state.engine(s.resolved_state_url()).connect() as c:
        actor = c.execute(sa.select(state.audit.c.actor).where(state.audit.c.action == "unlock")).scalar()
    assert actor.split("@")[0] == pwd.getpwuid(os.geteuid()).pw_name != "someone-else"


def test_the_heartbeat_keeps_a_live_lease_and_a_forced_unlock_is_noticed(tmp_path):
    s = Settings(home=tmp_path, refresh_lock_lease_s=0.9)
    with refresh_lock(s) as lock:
        first = _row(s).expires_at
        time.sleep(1.5)                       # longer than the lease: renewed meanwhile
        assert _row(s).expires_at > first and not lock.lost
        removed = force_unlock(s, reason="test: holder looked stuck", actor="tester")
        assert removed["owner"] == lock.owner
        deadline = time.time() + 5
        while not lock.lost and time.time() < deadline:
            time.sleep(0.1)
        with pytest.raises(RefreshLockedError, match="lost the lock"):
            lock.check()
    with state.engine(s.resolved_state_url()).connect() as c:
        audit = c.execute(sa.select(state.audit).where(state.audit.c.action == "unlock")).first()
    assert audit.from_value == removed["owner"] and audit.actor == "tester" and "stuck" in audit.reason


def test_on_postgres_a_live_session_holds_the_lock_even_without_its_row(tmp_path):
    s = Settings(home=tmp_path, state_url=POSTGRES.replace("postgresql://", "postgresql+psycopg://"),
                 feast_project=f"lock{os.getpid()}")
    with refresh_lock(s) as lock:
        force_unlock(s, reason="test")          # the row is gone, the session's advisory lock is not
        with pytest.raises(RefreshLockedError, match="advisory lock"):
            RefreshLock(s).acquire()
        assert lock._advisory is not None
    with refresh_lock(s):                       # released with its holder
        pass


def test_commands_that_would_overlap_a_refresh_wait_for_it(tmp_path):
    s = Settings(home=tmp_path)
    env = {"SEMALIGN_HOME": str(tmp_path)}
    with refresh_lock(s):
        for args in (["promote", "1"], ["rollback"], ["codebook", "build", "--data", str(tmp_path)]):
            proc = _cli(*args, env=env, check=False, timeout=120)
            assert proc.returncode == 1 and "another refresh of project" in proc.stderr, (args, proc.stderr[-500:])
    refused = _cli("unlock", env=env, check=False, timeout=120)
    assert refused.returncode == 1 and "--force" in refused.stderr
