#!/bin/sh
# One Postgres, one database per system (semalign's state, Feast's registry and offline store share `semalign`),
# and `scorer`: the scoring service's role, allowed to read semalign's tables and nothing else.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v scorer_password="$POSTGRES_SCORER_PASSWORD" <<'SQL'
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE ROLE scorer LOGIN PASSWORD :'scorer_password';
GRANT CONNECT ON DATABASE semalign TO scorer;
GRANT USAGE ON SCHEMA public TO scorer;
ALTER DEFAULT PRIVILEGES FOR ROLE semalign IN SCHEMA public GRANT SELECT ON TABLES TO scorer;
SQL
