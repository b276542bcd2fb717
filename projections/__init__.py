"""PostgreSQL read models: folded from the history topics, rebuilt by replaying them.

- :mod:`projections.projector` -- the projector: batches in, one transaction each with
  the positions, outages waited out, one active projector per schema;
- :mod:`projections.source` -- the history topics as it reads them (Kafka);
- :mod:`projections.rows` -- what each event does to the rows, and a batch coalesced;
- :mod:`projections.store` -- the SQL that writes a batch;
- :mod:`projections.lock` -- the schema lock that keeps a second projector standing by;
- :mod:`projections.database` -- connections, migrations, rebuild's drop;
- :mod:`projections.queries` -- what readers ask.
"""
