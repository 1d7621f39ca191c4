#!/bin/sh
# One Postgres, one database and one role per system; the superuser (POSTGRES_USER) only runs this and the health
# check. `worker` owns semalign's database (its state, Feast's registry and offline store), `mlflow` and `prefect`
# own theirs, and `scorer`, the scoring service's role, may read semalign's tables and MLflow's (the registry it
# serves from) and nothing else: it cannot write, nor move an alias.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v worker_password="$POSTGRES_WORKER_PASSWORD" -v mlflow_password="$POSTGRES_MLFLOW_PASSWORD" \
     -v prefect_password="$POSTGRES_PREFECT_PASSWORD" -v scorer_password="$POSTGRES_SCORER_PASSWORD" <<'SQL'
CREATE ROLE worker LOGIN PASSWORD :'worker_password';
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE ROLE scorer LOGIN PASSWORD :'scorer_password';
ALTER DATABASE semalign OWNER TO worker;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE prefect OWNER prefect;
REVOKE CONNECT ON DATABASE semalign, mlflow, prefect FROM PUBLIC;
GRANT CONNECT ON DATABASE semalign, mlflow TO scorer;
GRANT USAGE ON SCHEMA public TO scorer;
ALTER DEFAULT PRIVILEGES FOR ROLE worker IN SCHEMA public GRANT SELECT ON TABLES TO scorer;
\connect mlflow
GRANT USAGE ON SCHEMA public TO scorer;
ALTER DEFAULT PRIVILEGES FOR ROLE mlflow IN SCHEMA public GRANT SELECT ON TABLES TO scorer;
SQL
