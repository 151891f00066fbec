-- One PostgreSQL for the team stack: a database each for Prefect and MLflow.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
