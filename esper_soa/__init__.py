"""esper_soa: batched, compiled seed-lifecycle environment engine (see README.md)."""
