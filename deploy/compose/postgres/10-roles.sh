#!/bin/sh
# Runs once, when the postgres container initialises its data directory: the roles of the demo.
#   poolwatch: LOGIN, member of pg_monitor, nothing else (also PgBouncer's stats_users entry)
#   app:       LOGIN, owner of database app (the application, through PgBouncer)
# psql reads the passwords from the mounted secrets itself (\set with backticks), so they
# appear in no command line.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-postgres}" <<'SQL'
\set poolwatch_password `cat /run/secrets/poolwatch-password`
\set app_password `cat /run/secrets/app-password`
CREATE ROLE poolwatch LOGIN PASSWORD :'poolwatch_password' IN ROLE pg_monitor;
CREATE ROLE app LOGIN PASSWORD :'app_password';
CREATE DATABASE app OWNER app;
SQL
