-- Runs once, when the Postgres volume is first initialised (as POSTGRES_USER = mlflow):
-- the basic-auth app keeps its users and permissions in their own database.
CREATE DATABASE mlflow_auth;
