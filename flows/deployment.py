"""`schedule()`: registers the one `refresh` flow (flows/refresh.py) as a cron deployment on a process work pool
of the configured Prefect server. Parameters carry only the data path and SEMALIGN_HOME; everything else
(credentials included) comes from the worker's environment, so no secret is stored in Prefect."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path


def schedule(data: str, home: str, cron: str, pool: str = "semalign", name: str = "semalign-refresh",
             timezone: str = "UTC") -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
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
        dep_id = deployable.deploy(name=name, work_pool_name=pool, schedules=[Cron(cron, timezone=timezone)],
                                   parameters={"data": str(Path(data).resolve()), "home": str(Path(home).resolve())},
                                   build=False, push=False, print_next_steps=False)
    return {"deployment_id": str(dep_id), "deployment": f"refresh/{name}", "work_pool": pool, "cron": cron,
            "timezone": timezone, "api": str(api),
            "worker": f"prefect worker start --pool {pool}"}
