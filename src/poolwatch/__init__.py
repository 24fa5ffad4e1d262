"""poolwatch: PgBouncer and PostgreSQL connection-pool health for Prometheus."""

__version__ = "0.1.0"
