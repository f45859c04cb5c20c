"""The plain-Python, object-per-env oracle of the same SPEC, for differential tests and the
"before" benchmarks. It imports only the core's constants and field tables."""
