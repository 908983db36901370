"""commubo-etl: sync commubo connect call history into a PostgreSQL warehouse."""
