-- one Postgres, one database per system (semalign's state, Feast's registry and offline store share `semalign`)
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
