"""`schedule()`: registers the one `refresh` flow (flows/refresh.py) as a cron deployment on a process work pool
of the configured Prefect server. Parameters carry only the data path and SEMALIGN_HOME; everything else
(credentials included) comes from the worker's environment, so no secret is stored in Prefect."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def schedule(data: str, home: str, cron: str, pool: str = "semalign", name: str = "semalign-refresh",
             timezone: str = "UTC", ray_address: str | None = None) -> dict:
    """With `ray_address`, the deployment's runs get SEMALIGN_RAY_ADDRESS in their environment (a job variable of
    the process pool; an address is not a secret): they compute on that Ray cluster."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.schedules import Cron

    from semalign.flows.refresh import refresh

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        except ObjectAlreadyExists:
            pass
        api = client.api_url
    source = Path(__file__).resolve().parent
    deployable = refresh.from_source(source=str(source), entrypoint="refresh.py:refresh")
    with contextlib.redirect_stdout(sys.stderr):  # Prefect's advice text would spoil `--json` on stdout
        # one run at a time: a run due while another runs is cancelled by the server, and a run that finds the
        # lock taken by a refresh started elsewhere (`semalign run`) ends as Skipped (flows/refresh.py)
        dep_id = deployable.deploy(name=name, work_pool_name=pool, schedules=[Cron(cron, timezone=timezone)],
                                   concurrency_limit=ConcurrencyLimitConfig(
                                       limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
                                   parameters={"data": str(Path(data).resolve()), "home": str(Path(home).resolve())},
                                   job_variables={"env": {"SEMALIGN_RAY_ADDRESS": ray_address}} if ray_address else None,
                                   build=False, push=False, print_next_steps=False)
    return {"deployment_id": str(dep_id), "deployment": f"refresh/{name}", "work_pool": pool, "cron": cron,
            "timezone": timezone, "api": str(api),
            "concurrency_limit": 1, "worker": f"prefect worker start --pool {pool}",
            **({"ray_address": ray_address} if ray_address else {})}
